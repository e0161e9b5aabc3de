#!/usr/bin/env bash
# The generator's spool stays bounded while it runs: one generator sends RATE records/s to the
# filter (real RabbitMQ for the broker-bound tenth) for MINUTES, and every second its spool's
# size on disk is sampled. The bound is the window (GENERATOR_WINDOW unacked records, each line
# at most RECORD_LINE bytes) plus one 4 MiB segment; the check fails if the spool ever passes it,
# or if the run lost records.
#
#   scripts/spool-check.sh 10 3000     # 10 minutes at 3 000 records/s (docs/benchmarks.md)
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-1} RATE=${2:-3000}
[[ $MINUTES =~ ^[1-9][0-9]*$ && $RATE =~ ^[1-9][0-9]*$ ]] || {
  echo "usage: scripts/spool-check.sh [MINUTES] [RATE]" >&2; exit 2; }
source scripts/deps.sh
export MONGODB_URL= # empty: verify skips MongoDB; the broker-bound tenth is checked in PostgreSQL
source scripts/lib.sh
mesh_setup spool
source scripts/faults.sh

WINDOW=${GENERATOR_WINDOW:-10000}
COUNT=$((MINUTES * 60 * RATE))
SOURCES=("spool-$RANDOM")
export AMQP_PREFIX="flowmesh-spool"
mesh_ports 23100
export GENERATOR_SPOOL_DIR="$WORK/spool"
export GENERATOR_SOURCE=${SOURCES[0]} GENERATOR_COUNT=$COUNT GENERATOR_RATE=$RATE GENERATOR_WINDOW=$WINDOW
temp_database spool

cleanup() { mesh_teardown; rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT; trap 'exit 143' TERM

start filter
start pg-writer
wait_ready filter "$FILTER_HTTP_ADDR"
wait_ready pg-writer "$PG_WRITER_HTTP_ADDR"
start generator
# The longest line a record makes in the spool: `G ` + its JSON + newline (the JSON carries a
# UUID, a timestamp, the source, seq, value, hash and a traceparent).
RECORD_LINE=512
BOUND=$((WINDOW * RECORD_LINE + 4 * 1024 * 1024))
max=0 samples=0 compactions=0 started=$SECONDS
while kill -0 "${PID[generator]}" 2>/dev/null; do
  size=$(du -sb "$WORK/spool" 2>/dev/null | cut -f1 || true)
  size=${size:-0}
  if ((size > max)); then max=$size; fi
  samples=$((samples + 1))
  seen=$(curl -fsS "http://$GENERATOR_HTTP_ADDR/metrics" 2>/dev/null |
    awk '$1 == "flowmesh_generator_spool_compactions_total" { print int($2) }' || true)
  [ -n "$seen" ] && compactions=$seen
  if ((SECONDS - started > MINUTES * 60 * 3)); then log "the generator did not finish in 3× its time"; exit 1; fi
  sleep 1
done
wait "${PID[generator]}" || { log "the generator failed; the end of its log:"; tail -n 20 "$WORK/generator.log" >&2; exit 1; }
unset 'PID[generator]'
took=$((SECONDS - started))
# The writer drains the broker-bound tenth before the check reads PostgreSQL.
for _ in $(seq 120); do
  depth=$(rabbitmqctl -q list_queues name messages 2>/dev/null |
    awk -v q="$AMQP_PREFIX.records.pg-writer" '$1 == q { print $2 }')
  [ "${depth:-1}" = 0 ] && break
  sleep 1
done
report=$(verify_json)
read -r ok lost duplicated _ <<<"$(summary "$report")"
printf '%s records at %s/s for %s min (took %s s): spool peak %s KiB of a bound of %s KiB ' \
  "$COUNT" "$RATE" "$MINUTES" "$took" $((max / 1024)) $((BOUND / 1024))
printf '(window %s × %s B + 4 MiB), %s samples, %s compactions seen; lost %s, duplicated %s\n' \
  "$WINDOW" "$RECORD_LINE" "$samples" "$compactions" "$lost" "$duplicated"
((max <= BOUND)) || { log "FAIL: the spool passed its bound"; exit 1; }
[ "$ok" = True ] && [ "$lost" = 0 ] || { log "FAIL: verify: $report"; exit 1; }
