#!/usr/bin/env bash
# Runs the project's own Dockerfile and docker-compose.yml for real and proves the mesh works in
# containers: every service healthy by its own healthcheck, records flowing, `verify` (in a
# container on the same network and volumes) reconciling the file volume, PostgreSQL and
# MongoDB, Prometheus scraping every target, JSON log lines; then `docker kill` of the filter and
# a restart of RabbitMQ while records flow, and `verify` again. Tears everything down (`down -v`)
# even when a step fails, and prints one summary line per step.
#
# Images: pulled where a registry answers; otherwise the local stand-ins (docker/standins/,
# built once per machine) under the official names, plus docker/compose.standins.yml, which only
# puts Grafana and Jaeger (no stand-ins) behind profiles and turns trace export off. The compose
# file itself is used unchanged.
#
# Skips (exit 0, saying so) when no Docker engine answers. Needs root where stand-ins must be
# built (debootstrap).
#
# Environment: COMPOSE_CHECK_PROJECT (compose project name, default flowmesh-check),
# COMPOSE_CHECK_RATE (records per second while checking, default 200), COMPOSE_CHECK_LOGS (where
# every service's log is kept, default var/compose-check), FLOWMESH_*_PORT (host ports; defaults
# here are in the 17000s so nothing clashes with a native run).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[compose] %s\n' "$*" >&2; }

if ! docker info >/dev/null 2>&1; then
  log "SKIPPED: no Docker engine answers (docker info failed)"
  exit 0
fi
if docker compose version >/dev/null 2>&1; then
  COMPOSE_BIN=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  COMPOSE_BIN=(docker-compose)
else
  log "SKIPPED: neither 'docker compose' nor 'docker-compose' is installed"
  exit 0
fi

export COMPOSE_PROJECT_NAME=${COMPOSE_CHECK_PROJECT:-flowmesh-check}
# The host side of each published port (docker-compose.yml's FLOWMESH_*_PORT), unless set.
for setting in AMQP:17672 RABBITMQ_UI:17673 RABBITMQ_METRICS:17692 POSTGRES:17432 MONGODB:17017 \
  FILTER:17080 FILTER_PROBE:17102 PG_WRITER:17103 MONGO_WRITER:17104 GENERATOR:17101 \
  PROMETHEUS:17090 GRAFANA:17300; do
  name=FLOWMESH_${setting%%:*}_PORT
  export "$name=${!name:-${setting##*:}}"
done
export GENERATOR_RATE=${COMPOSE_CHECK_RATE:-200}
SOURCE=compose-generator # the compose file's GENERATOR_SOURCE
FILES=(-f docker-compose.yml)
LOGS=${COMPOSE_CHECK_LOGS:-var/compose-check}
# The mesh's own services come from the one list (common/src/services.rs, printed by `services`).
mapfile -t MESH < <(cargo run --quiet --bin services | cut -d' ' -f1)
[ ${#MESH[@]} -gt 0 ] || { log "cannot list the mesh's services (cargo run --bin services)"; exit 1; }
SERVICES=(rabbitmq postgres mongodb "${MESH[@]}" prometheus)
SUMMARY=()
FAILED=0

compose() { "${COMPOSE_BIN[@]}" "${FILES[@]}" "$@"; }
source scripts/compose-lib.sh

step() { # name command…: runs one step, records its line, stops the check at the first failure
  local name=$1 started=$SECONDS
  shift
  log "step: $name"
  if "$@"; then
    SUMMARY+=("ok      $name ($((SECONDS - started)) s)")
  else
    SUMMARY+=("FAILED  $name ($((SECONDS - started)) s)")
    FAILED=1
    return 1
  fi
}

finish() {
  local status=$? service
  # Every service's whole log is kept for reading afterwards; a failure prints their tails.
  mkdir -p "$LOGS"
  for service in "${SERVICES[@]}"; do
    compose logs --no-color "$service" >"$LOGS/$service.log" 2>&1 || true
  done
  if [ "$FAILED" -ne 0 ] || [ "$status" -ne 0 ]; then
    log "service logs (last 40 lines each; all of them in $LOGS/):"
    for service in "${SERVICES[@]}"; do
      tail -n 40 "$LOGS/$service.log" | sed "s/^/[compose:$service] /" >&2 || true
    done
  fi
  log "tearing down (down -v)"
  compose --profile grafana --profile traces down -v --remove-orphans >/dev/null 2>&1 \
    || compose down -v --remove-orphans >/dev/null 2>&1 || true
  log "summary:"
  for line in "${SUMMARY[@]}"; do log "  $line"; done
  if [ "$FAILED" -ne 0 ] || [ "$status" -ne 0 ]; then log "FAILED"; exit 1; fi
  log "OK: the compose file runs healthy, records flow and reconcile, faults heal"
}
trap finish EXIT

images() {
  if timeout 30 docker pull -q debian:bookworm-slim >/dev/null 2>&1; then
    log "a registry answers: pulling the official images"
    compose pull --quiet
  else
    log "no registry answers: using the local stand-ins under the official names"
    bash docker/standins/build.sh
    FILES+=(-f docker/compose.standins.yml)
  fi
  compose config -q
  log "building the project's image from its Dockerfile"
  compose build
}

up() { compose up -d && healthy 300 "${SERVICES[@]}"; }

acked() { generator_acked "127.0.0.1:$FLOWMESH_GENERATOR_PORT"; }

flowing() { # COUNT more of the generator's records get acked (within 120 s)
  local want=$(($(acked) + $1)) deadline=$((SECONDS + 120))
  until [ "$(acked)" -ge "$want" ]; do
    [ "$SECONDS" -ge "$deadline" ] && { log "fewer than $1 records acked in 120 s ($(acked) of $want)"; return 1; }
    sleep 1
  done
}

reconciled() { # stop the generator (it drains), then verify until the writers caught up
  compose stop generator >/dev/null || return 1
  local n
  n=$(generated generator) || return 1
  log "the generator made seqs 1..$n; verifying"
  verify_in_container "$SOURCE" "$n"
}

faults() { # records flow again; kill -9 the filter, restart RabbitMQ; the mesh heals itself
  compose start generator >/dev/null || return 1
  flowing 2000 || return 1
  log "docker kill of the filter"
  docker kill "$(cid filter)" >/dev/null || return 1
  # Docker counts `docker kill` as a manual stop, which `restart: unless-stopped` leaves alone
  # (a crash would be restarted): start it again as an operator would.
  compose start filter >/dev/null || return 1
  healthy 180 "${SERVICES[@]}" || return 1
  flowing 2000 || return 1
  log "restart of the rabbitmq container"
  compose restart rabbitmq >/dev/null || return 1
  healthy 300 "${SERVICES[@]}" || return 1
  flowing 3000
}

step "images (pulled, or local stand-ins)" images
step "every service healthy" up
step "records flow" flowing 4000
step "Prometheus: every target up" targets_up 5
step "verify: file, PostgreSQL and MongoDB reconcile" reconciled
step "logs are JSON lines" json_logs "${MESH[@]}"
step "faults: docker kill filter, restart rabbitmq" faults
step "verify after the faults" reconciled
