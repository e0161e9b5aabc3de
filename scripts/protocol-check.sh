#!/usr/bin/env bash
# Starts a filter binary on spare ports with a private RabbitMQ prefix and data directory, runs
# the Python client of tests/clients against it, and cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh

PY=python3
if ! $PY -c 'import websockets.sync.client' 2>/dev/null; then
  VENV=$(target_dir)/pyenv
  [ -x "$VENV/bin/python" ] || $PY -m venv "$VENV" 2>/dev/null || { apt-get install -y -qq python3-venv >/dev/null && $PY -m venv "$VENV"; }
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check 'websockets>=13'
  PY="$VENV/bin/python"
fi

cargo build --quiet --bin filter
FILTER=$(target_dir)/debug/filter
WORK=$(mktemp -d)
# A fixed prefix: its queues are deleted after each run, its two exchanges are reused.
PREFIX="flowmesh-protocheck"
TOKEN="protocol-check-$$-$RANDOM-$RANDOM"
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
FILTER_LISTEN=127.0.0.1:28080 FILTER_HTTP_ADDR=127.0.0.1:29102 FILTER_DATA_DIR="$WORK" \
  AMQP_PREFIX="$PREFIX" FILTER_TOKEN="$TOKEN" FILTER_MAX_FRAME_BYTES=64KiB \
  "$FILTER" >"$WORK/filter.log" 2>&1 &
FILTER_PID=$!
cleanup() {
  kill -TERM "$FILTER_PID" 2>/dev/null || true
  wait "$FILTER_PID" 2>/dev/null || true
  for q in "$PREFIX.records.pg-writer" "$PREFIX.records.mongo-writer" "$PREFIX.dead-letter"; do
    rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
for _ in $(seq 100); do
  "$FILTER" --probe-ready --http-addr 127.0.0.1:29102 >/dev/null 2>&1 && break
  sleep 0.2
done
$PY tests/clients/spec_client.py ws://127.0.0.1:28080/ingest "$TOKEN" 65536
