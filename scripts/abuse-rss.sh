#!/usr/bin/env bash
# Measures the filter's memory under hostile clients (tests/clients/abuse.py): one 1 MiB frame of
# half a million items, 1 200 idle connections from one address, and a flood of invalid records
# from a client that never reads its answers; then checks that a well-behaved generator still
# gets every record acked. Runs the release binaries on spare ports with a private RabbitMQ prefix.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
source scripts/lib.sh
mesh_setup abuse
export AMQP_PREFIX=flowmesh-abuse
mesh_ports 28180
# Every process this script started, whatever ended it.
trap 'mesh_teardown; rm -rf "$WORK"' EXIT
# A stop (Ctrl-C, kill) runs the exit trap too.
trap 'exit 130' INT; trap 'exit 143' TERM
start filter
wait_ready filter "$FILTER_HTTP_ADDR"
start generator GENERATOR_RATE=200 GENERATOR_COUNT=6000 GENERATOR_SOURCE=abuse-check \
  GENERATOR_SPOOL_DIR="$WORK/spool"
python3 tests/clients/abuse.py 127.0.0.1 28180 "${PID[filter]}" "$FILTER_DATA_DIR/dead-letter.jsonl"
status=0; wait "${PID[generator]}" || status=$?; PID[generator]=""
if [ "$status" = 0 ]; then echo "well-behaved generator: all 6000 records acked meanwhile"; else echo "well-behaved generator FAILED"; exit 1; fi
