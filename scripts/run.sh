#!/usr/bin/env bash
# Runs the whole mesh natively: installs and starts RabbitMQ and PostgreSQL when missing, builds
# the services, and starts them with prefixed logs. Ctrl-C stops everything cleanly (SIGTERM to
# each service, which drains and exits).
#
# Environment (all optional): GENERATOR_RATE (default 5), LOG_FORMAT (json|text, default text
# here for reading in a terminal), DATA_DIR (default ./var), AMQP_URL, DATABASE_URL, MONGODB_URL,
# FILTER_TOKEN / FILTER_TOKEN_FILE (default: a random token in var/filter-token). Every port
# listens on 127.0.0.1.
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
# Loopback only, and a token on the WebSocket hop (a file readable by this user only, never a
# flag): what the demo opens is not open to the network.
export FILTER_LISTEN=${FILTER_LISTEN:-127.0.0.1:8080}
for service in GENERATOR:9101 FILTER:9102 PG_WRITER:9103 MONGO_WRITER:9104; do
  var=${service%%:*}_HTTP_ADDR
  export "$var=${!var:-127.0.0.1:${service##*:}}"
done
if [ -z "${FILTER_TOKEN:-}" ] && [ -z "${FILTER_TOKEN_FILE:-}" ]; then
  export FILTER_TOKEN_FILE=$DATA_DIR/filter-token
  [ -s "$FILTER_TOKEN_FILE" ] || (umask 077; python3 -c 'import secrets; print(secrets.token_hex(24))' >"$FILTER_TOKEN_FILE")
fi

echo "[run] building (release)…" >&2
cargo build --release --quiet --bins
BIN=$(target_dir)/release

declare -A pids=()
start() {
  local name=$1; shift
  # The service runs as the subshell's own process (exec), so $! is its pid; every line is
  # prefixed with its name. Both ignore SIGINT: Ctrl-C reaches this script, which stops the
  # services in order below, and the prefixer outlives them to print their last lines.
  ( trap '' INT; exec "$BIN/$name" "$@" ) > >(trap '' INT; exec sed -u "s/^/[$name] /") 2>&1 &
  pids[$name]=$!
}

stop() {
  local pid=${pids[$1]:-}
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
}

stop_all() {
  trap - INT TERM
  echo "[run] stopping…" >&2
  # Generator first (stops intake), then the rest; only the processes this script started.
  stop generator
  sleep 1
  for name in "${!pids[@]}"; do stop "$name"; done
  wait "${pids[@]}" 2>/dev/null || true
  echo "[run] stopped" >&2
}
trap stop_all INT TERM

# The services from the one list (common/src/services.rs): everything but the generator first.
mapfile -t SERVICES < <("$BIN/services")
for line in "${SERVICES[@]}"; do
  read -r name _ role _ <<<"$line"
  [ "$role" = generator ] || start "$name"
done
# Let the filter become ready before records start to flow (the generator would wait anyway).
for _ in $(seq 100); do "$BIN/filter" --probe-ready >/dev/null 2>&1 && break; sleep 0.2; done
start generator --rate "${GENERATOR_RATE:-5}"

ports=""
for line in "${SERVICES[@]}"; do read -r name port _ <<<"$line"; ports+=" :$port ($name)"; done
echo "[run] mesh running: metrics on$ports; Ctrl-C stops" >&2
wait "${pids[@]}"
