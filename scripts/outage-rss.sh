#!/usr/bin/env bash
# Measures each service's memory (RSS) during a long outage while records keep coming, to show
# every buffer is bounded. Prints one row per sample, then heals, waits for the mesh to drain,
# and runs verify.
#
#   scripts/outage-rss.sh rabbitmq 10     # RabbitMQ stopped for 10 minutes
#   scripts/outage-rss.sh stores 10       # PostgreSQL stopped, MongoDB (in-memory store) failing
#                                         # and the file sink immutable, for 10 minutes
# Needs root (it stops RabbitMQ/PostgreSQL and uses chattr). Environment: RATE (default 200/s).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
KIND=${1:?rabbitmq or stores}
MINUTES=${2:-10}
RATE=${RATE:-200}
source scripts/lib.sh
mesh_setup rss
export AMQP_PREFIX="flowmesh-rss-$KIND"
mesh_ports 28080
temp_database rss
export GENERATOR_RATE=$RATE GENERATOR_SOURCE="rss-$KIND-$RANDOM"
# After the heal the generator is stopped and must first hand over everything in its window; the
# filter's reconnect backoff after a long outage can outlast the default grace of 20 s.
export GENERATOR_GRACE=300s
export GENERATOR_SPOOL_DIR="$WORK/spool" MONGO_WRITER_STORE=memory MONGO_WRITER_MEMORY_FAIL_WHILE="$WORK/mongodb-down"
INJECTED=0
# On any exit: heal what was injected, stop every process this script started, drop its
# database and queues.
cleanup() {
  [ "$INJECTED" = 1 ] && heal
  mesh_teardown
}
trap 'cleanup >/dev/null 2>&1 || true' EXIT
# A stop (Ctrl-C, kill) runs the exit trap too.
trap 'exit 130' INT; trap 'exit 143' TERM
for s in filter pg-writer mongo-writer; do start "$s"; done
sleep 2
start generator
rss() { rss_mib "$1"; }
pgv=$(ls /etc/postgresql | sort -V | tail -1)
heal() {
  case $KIND in
    rabbitmq) rabbitmqctl -q start_app; rabbitmqctl -q await_startup ;;
    stores) pg_ctlcluster --skip-systemctl-redirect "$pgv" main start; rm -f "$WORK/mongodb-down"; chattr -R -i "$FILTER_DATA_DIR" ;;
  esac
}
sleep 20
INJECTED=1
case $KIND in
  rabbitmq) rabbitmqctl -q stop_app ;;
  stores) pg_ctlcluster --skip-systemctl-redirect "$pgv" main stop -m fast; touch "$WORK/mongodb-down"; chattr -R +i "$FILTER_DATA_DIR" ;;
esac
echo "outage of $KIND for $MINUTES min at $RATE records/s — RSS in MiB"
printf '%8s %10s %8s %10s %13s\n' elapsed_s generator filter pg-writer mongo-writer
start=$(date +%s)
while [ $(( $(date +%s) - start )) -lt $((MINUTES * 60)) ]; do
  printf '%8s %10s %8s %10s %13s\n' $(( $(date +%s) - start )) "$(rss "${PID[generator]}")" "$(rss "${PID[filter]}")" "$(rss "${PID[pg-writer]}")" "$(rss "${PID[mongo-writer]}")"
  sleep 30
done
printf '%8s %10s %8s %10s %13s\n' $(( $(date +%s) - start )) "$(rss "${PID[generator]}")" "$(rss "${PID[filter]}")" "$(rss "${PID[pg-writer]}")" "$(rss "${PID[mongo-writer]}")"
heal; INJECTED=0
echo "healed; draining…"
stop generator
# mongo-writer ran on its in-memory store, which no other process can read: verify checks the
# file and PostgreSQL (a MongoDB server on this machine holds nothing of this run).
verified=1
for _ in $(seq 240); do
  "$BIN/verify" --source "$GENERATOR_SOURCE" --data-dir "$FILTER_DATA_DIR" --mongodb-url "" >"$WORK/verify.txt" 2>&1 && { verified=0; break; }
  sleep 1
done
cat "$WORK/verify.txt"
exit "$verified"
