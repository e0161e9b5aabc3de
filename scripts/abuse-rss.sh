#!/usr/bin/env bash
# Measures the filter's memory under hostile clients (tests/clients/abuse.py): one 1 MiB frame of
# half a million items, 1 200 idle connections from one address, and a flood of invalid records
# from a client that never reads its answers; then checks that a well-behaved generator still
# gets every record acked. Runs the release binaries on spare ports with a private RabbitMQ prefix.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo build --release --quiet --bins
BIN=$(target_dir)/release
WORK=$(mktemp -d)
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f} AMQP_PREFIX=flowmesh-abuse LOG_FORMAT=json
FILTER_LISTEN=127.0.0.1:28180 FILTER_HTTP_ADDR=127.0.0.1:28182 FILTER_DATA_DIR="$WORK" \
  "$BIN/filter" >"$WORK/filter.log" 2>&1 &
FILTER=$!
GEN=""
cleanup() {
  # Every process this script started, whatever ended it.
  [ -n "$GEN" ] && { kill -TERM "$GEN" 2>/dev/null || true; wait "$GEN" 2>/dev/null || true; }
  kill -TERM "$FILTER" 2>/dev/null || true; wait "$FILTER" 2>/dev/null || true
  for q in records.pg-writer records.mongo-writer dead-letter; do rabbitmqctl -q delete_queue "$AMQP_PREFIX.$q" >/dev/null 2>&1 || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
# A stop (Ctrl-C, kill) runs the exit trap too.
trap 'exit 130' INT; trap 'exit 143' TERM
for _ in $(seq 100); do "$BIN/filter" --probe-ready --http-addr 127.0.0.1:28182 >/dev/null 2>&1 && break; sleep 0.2; done
GENERATOR_HTTP_ADDR=127.0.0.1:28181 "$BIN/generator" --filter-url ws://127.0.0.1:28180/ingest \
  --rate 200 --count 6000 --source abuse-check >"$WORK/generator.log" 2>&1 &
GEN=$!
python3 tests/clients/abuse.py 127.0.0.1 28180 "$FILTER" "$WORK/dead-letter.jsonl"
status=0; wait "$GEN" || status=$?; GEN=""
if [ "$status" = 0 ]; then echo "well-behaved generator: all 6000 records acked meanwhile"; else echo "well-behaved generator FAILED"; exit 1; fi
