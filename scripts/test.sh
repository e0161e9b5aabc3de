#!/usr/bin/env bash
# Runs the whole test suite against real RabbitMQ, PostgreSQL and a MongoDB-speaking server
# (installed and started when missing): unit, in-process integration and end-to-end tests, a
# WebSocket client written in Python that checks the filter's protocol from outside, the
# chaos suite (part of it twice: once with packed RabbitMQ messages), the compose file run
# for real in Docker, and the mesh on a three-node RabbitMQ cluster under faults.
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS=()
# Runs one step of the suite and notes how long it took (the table at the end shows them all,
# also when a step failed).
step() {
  local name=$1 started status=0
  shift
  started=$(date +%s)
  "$@" || status=$?
  STEPS+=("$name	$(( $(date +%s) - started ))	$([ "$status" = 0 ] && echo ok || echo "FAILED ($status)")")
  return "$status"
}
step_table() {
  local total=0 line name seconds result
  [ ${#STEPS[@]} -gt 0 ] || return 0
  printf '\n%-44s %9s  %s\n' step seconds result >&2
  for line in "${STEPS[@]}"; do
    IFS=$'\t' read -r name seconds result <<<"$line"
    printf '%-44s %9s  %s\n' "$name" "$seconds" "$result" >&2
    total=$((total + seconds))
  done
  printf '%-44s %9s\n' total "$total" >&2
  printf 'disk free at the start: %s, at the end: %s\n' "$DISK_FREE_AT_START" "$(disk_free)" >&2
}
# Free space on the checkout's file system: a build or a Docker image that fills it fails in
# ways that look like anything else, so the table says how much there was.
disk_free() { df -Ph . | awk 'NR == 2 { print $4 }'; }
DISK_FREE_AT_START=$(disk_free)
trap step_table EXIT

# Sourced at the top level (its functions and variables are for the steps below), and timed
# by hand: run through `step`, its commands would not stop it on a failure.
deps_started=$(date +%s)
source scripts/deps.sh
STEPS+=("dependencies (deps.sh)	$(( $(date +%s) - deps_started ))	ok")

export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export DATABASE_URL=${DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/flowmesh}

# MONGODB_URL set to an empty string on purpose skips the real-MongoDB tests; unset, it is the
# server deps.sh started.
if [ -z "${MONGODB_URL-unset}" ]; then
  echo "[test] MONGODB_URL is empty: the real-MongoDB tests will be SKIPPED" >&2
else
  export MONGODB_URL=${MONGODB_URL:-mongodb://127.0.0.1:27017}
fi

if cargo nextest --version >/dev/null 2>&1; then
  step "unit and integration tests (nextest)" cargo nextest run --workspace --all-features --no-fail-fast
else
  step "unit and integration tests (cargo test)" cargo test --workspace --all-features --no-fail-fast
fi

if [ -z "${MONGODB_URL:-}" ]; then
  echo "[test] note: the real-MongoDB tests were SKIPPED (MONGODB_URL empty)" >&2
fi

step "protocol check" bash scripts/protocol-check.sh

step "observability check" bash scripts/observability-check.sh

# The chaos suite (about ten minutes; it stops and starts RabbitMQ and PostgreSQL on this
# machine, so it needs root). CHAOS=0 skips it for a quick local run.
# Then four of its scenarios with the filter packing broker-bound records (FILTER_PUBLISH_PACK,
# docs/contracts.md §4), at 3 000 records/s so that frames, and so messages, hold several.
if [ "${CHAOS:-1}" != 0 ]; then
  step "chaos suite" bash scripts/chaos.sh
  step "chaos suite, packed messages (4 scenarios)" env FILTER_PUBLISH_PACK=100 CHAOS_RATE=3000 \
    CHAOS_COUNT=30000 bash scripts/chaos.sh kill-filter rabbitmq-restart kill-pg-writer kill-mongo-writer
  # A short soak: three sources for SOAK_MINUTES (default 4), a seeded fault every minute, RSS,
  # files, disk and queues sampled; fails on loss, duplicates, dead letters or growth.
  step "soak (${SOAK_MINUTES:-4} min)" bash scripts/soak.sh "${SOAK_MINUTES:-4}"
fi

# The project's own Dockerfile and docker-compose.yml, run for real, when a Docker engine answers
# (it says plainly when it skipped). COMPOSE=0 skips it.
if [ "${COMPOSE:-1}" != 0 ]; then
  step "compose check" bash scripts/compose-check.sh
else
  echo "[test] COMPOSE=0: the docker compose check was SKIPPED" >&2
fi

# The mesh on a three-node RabbitMQ cluster (docker-compose.cluster.yml's nodes), each fault
# injected while records flow, then `verify`; when a Docker engine answers (it says plainly when
# it skipped). CLUSTER=0 skips it.
if [ "${CLUSTER:-1}" != 0 ]; then
  step "cluster check" bash scripts/cluster-check.sh
else
  echo "[test] CLUSTER=0: the RabbitMQ cluster check was SKIPPED" >&2
fi
