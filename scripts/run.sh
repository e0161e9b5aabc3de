#!/usr/bin/env bash
# Runs the whole mesh natively: installs and starts RabbitMQ and PostgreSQL when missing, builds
# the services, and starts them with prefixed logs. Ctrl-C stops everything cleanly (SIGTERM to
# each service, which drains and exits).
#
# Environment (all optional): GENERATOR_RATE (default 5), LOG_FORMAT (json|text, default text
# here for reading in a terminal), DATA_DIR (default ./var), AMQP_URL, DATABASE_URL, MONGODB_URL.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/deps.sh

export LOG_FORMAT=${LOG_FORMAT:-text}
export RUST_LOG=${RUST_LOG:-info}
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export DATABASE_URL=${DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/flowmesh}
DATA_DIR=${DATA_DIR:-var}
export FILTER_DATA_DIR=${FILTER_DATA_DIR:-$DATA_DIR/filter}
mkdir -p "$FILTER_DATA_DIR"

echo "[run] building (release)…" >&2
cargo build --release --quiet --bins
BIN=target/release

pids=()
start() {
  local name=$1; shift
  # Prefix every line with the service name. SIGINT is ignored inside, so Ctrl-C does not kill
  # the prefixing sed before the services have logged their last lines; they are stopped below.
  ( trap '' INT; "$BIN/$name" "$@" 2>&1 | sed -u "s/^/[$name] /" ) &
  pids+=($!)
}

stop_all() {
  trap - INT TERM
  echo "[run] stopping…" >&2
  # Generator first (stops intake), then the rest.
  pkill -TERM -x generator 2>/dev/null || true
  sleep 1
  for name in filter pg-writer mongo-writer; do pkill -TERM -x "$name" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
  echo "[run] stopped" >&2
}
trap stop_all INT TERM

for service in filter pg-writer mongo-writer; do
  [ -x "$BIN/$service" ] && start "$service"
done
# Let the filter become ready before records start to flow (the generator would wait anyway).
for _ in $(seq 100); do "$BIN/filter" --probe-ready >/dev/null 2>&1 && break; sleep 0.2; done
start generator --rate "${GENERATOR_RATE:-5}"

echo "[run] mesh running: metrics on :9101 (generator) :9102 (filter) :9103 (pg-writer) :9104 (mongo-writer); Ctrl-C stops" >&2
wait "${pids[@]}"
