#!/usr/bin/env bash
# The mesh on a real three-node RabbitMQ cluster, proven by faults: the nodes of
# docker-compose.cluster.yml in containers (quorum queues with a replica on each), the mesh's own
# binaries on this machine with AMQP_URL listing the three nodes, three sources sending while
# each fault is injected and healed; then the generators stop and `verify` must find every
# record exactly once (file, PostgreSQL, MongoDB) and nothing dead-lettered.
#
# Faults so far (each prints one line: sent, lost, duplicated, dead-lettered, when the
# generators' last acks came, counted from the fault, and how long the stores took to catch up):
#   kill-leader   docker kill of the node holding the writer queues' leaders, started after 30 s
#   pause-node    docker pause of one node for 30 s
#
# Skips (exit 0, saying so) when no Docker engine answers. Tears the cluster down (down -v) and
# keeps every node's log under var/cluster-check/. Environment: CLUSTER_RATE (records per second
# per source, default 200), CLUSTER_SECONDS (how long each fault's run sends, default 60).
set -euo pipefail
cd "$(dirname "$0")/.."
LOG_TAG=cluster
source scripts/lib.sh
source scripts/faults.sh

if ! docker info >/dev/null 2>&1; then
  log "SKIPPED: no Docker engine answers (docker info failed)"
  exit 0
fi
if docker compose version >/dev/null 2>&1; then COMPOSE_BIN=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then COMPOSE_BIN=(docker-compose)
else log "SKIPPED: neither 'docker compose' nor 'docker-compose' is installed"; exit 0; fi

# PostgreSQL and the MongoDB server on this machine: the stores.
source scripts/deps.sh
LOG_TAG=cluster

export COMPOSE_PROJECT_NAME=${CLUSTER_PROJECT:-flowmesh-cluster}
# Node 1's published ports, away from a native RabbitMQ on this machine.
export FLOWMESH_AMQP_PORT=${FLOWMESH_AMQP_PORT:-27672} FLOWMESH_RABBITMQ_UI_PORT=${FLOWMESH_RABBITMQ_UI_PORT:-27673}
NODES=(rabbitmq-1 rabbitmq-2 rabbitmq-3)
LOGS=${CLUSTER_LOGS:-var/cluster-check}
RATE=${CLUSTER_RATE:-200}
SECONDS_PER_RUN=${CLUSTER_SECONDS:-60}
compose() { "${COMPOSE_BIN[@]}" -f docker-compose.cluster.yml "$@"; }
container() { compose ps -q "$1"; }
ip_of() { docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$(container "$1")"; }
node_of_ip() { local n; for n in "${NODES[@]}"; do [ "$(ip_of "$n")" = "$1" ] && echo "$n"; done; }

teardown() {
  mkdir -p "$LOGS"
  for n in "${NODES[@]}"; do compose logs --no-color "$n" >"$LOGS/$n.log" 2>&1 || true; done
  mesh_teardown
  compose down -v >/dev/null 2>&1 || true
}
trap teardown EXIT

# The nodes, and the one-shot service that ends once all three run as one cluster.
docker image inspect rabbitmq:3.13-management >/dev/null 2>&1 || bash docker/standins/build.sh
compose up -d rabbitmq-cluster >/dev/null
[ "$(docker inspect -f '{{.State.ExitCode}}' "$(container rabbitmq-cluster)")" = 0 ] ||
  { log "the three nodes did not form a cluster"; exit 1; }
URLS=()
for n in "${NODES[@]}"; do URLS+=("amqp://guest:guest@$(ip_of "$n"):5672/%2f"); done
AMQP_URL=$(IFS=,; echo "${URLS[*]}")
export AMQP_URL AMQP_PREFIX=cluster$RANDOM
log "cluster up: ${NODES[*]}"

# The native mesh, pointed at the cluster.
mesh_setup cluster
mesh_ports 23200
temp_database cluster-check
export MONGODB_URL=${MONGODB_URL:-mongodb://127.0.0.1:27017} MONGODB_DATABASE=cluster_$RANDOM
start filter
start_writers
wait_ready filter "$FILTER_HTTP_ADDR"

rabbitmqctl_on() { compose exec -T "$1" rabbitmqctl -q "${@:2}"; }
# The node that holds the leader of the writer queues (the first one listed).
leader_node() {
  local any
  for any in "${NODES[@]}"; do
    rabbitmqctl_on "$any" list_queues name leader 2>/dev/null |
      awk -v p="$AMQP_PREFIX.records." 'index($1, p) == 1 { sub(/^rabbit@/, "", $2); print $2; exit }' && return 0
  done
}

RESULTS=()
FAILED=0
run_fault() { # NAME INJECT HEAL: three sources for SECONDS_PER_RUN, INJECT after a quarter
  local name=$1 inject=$2 heal=$3 i started
  SOURCES=("$name-a" "$name-b" "$name-c")
  COUNT=$((RATE * SECONDS_PER_RUN))
  for i in 0 1 2; do
    start "generator$i" GENERATOR_SOURCE="${SOURCES[$i]}" GENERATOR_RATE="$RATE" \
      GENERATOR_COUNT="$COUNT" GENERATOR_HTTP_ADDR="127.0.0.1:$((NEXT_PORT + i))"
  done
  sleep $((SECONDS_PER_RUN / 4))
  started=$SECONDS
  "$inject"
  sleep 30
  "$heal"
  for i in 0 1 2; do wait_generator "generator$i"; done
  local sent_by=$((SECONDS - started))
  started=$SECONDS
  wait_reconciled
  local line
  line=$(REPORT=$REPORT python3 - "$name" "$COUNT" "$sent_by" "$((SECONDS - started))" "$OK" <<'PY'
import json, os, sys
name, count, sent_by, caught_up, ok = sys.argv[1:]
r = json.loads(os.environ["REPORT"])
dup = r["file"]["duplicated"] + sum((s or {}).get("duplicated", 0) for k, s in r.items() if k in ("postgresql", "mongodb"))
print(f"{name:<14} sent {int(count) * 3:>6}  lost {r['lost']}  duplicated {dup}  ok {ok}  "
      f"sending ended {sent_by} s after the fault  stores caught up {caught_up} s later")
PY
)
  RESULTS+=("$line")
  log "$line"
  [ "$OK" = True ] || FAILED=1
}

VICTIM=""
kill_leader() { VICTIM=$(leader_node); log "docker kill $VICTIM (leader of the writer queues)"; docker kill "$(container "$VICTIM")" >/dev/null; }
start_victim() { docker start "$(container "$VICTIM")" >/dev/null; compose up -d rabbitmq-cluster >/dev/null; }
pause_one() { VICTIM=rabbitmq-2; log "docker pause $VICTIM"; docker pause "$(container "$VICTIM")" >/dev/null; }
unpause_one() { docker unpause "$(container "$VICTIM")" >/dev/null; }

run_fault kill-leader kill_leader start_victim
run_fault pause-node pause_one unpause_one

printf '\n' >&2
for line in "${RESULTS[@]}"; do printf '%s\n' "$line" >&2; done
exit "$FAILED"
