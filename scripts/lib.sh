# What every script that runs the mesh's real binaries shares: one set-up, one start/stop by
# PID, one wait-ready, one memory and open-files sampler, one clean-up. Sourced after
# scripts/deps.sh (which starts RabbitMQ, PostgreSQL and MongoDB and defines `target_dir`).
#
#   mesh_setup NAME          release binaries built; URLs exported; a fresh WORK (= RUN_DIR)
#   services [ROLE]          the services of the one list (common/src/services.rs), or its
#                            writers, generators…: one `name probe_port role [store]` a line
#   mesh_ports BASE          the filter on BASE, each service's probe port above it,
#                            FILTER_URL, FILTER_DATA_DIR; NEXT_PORT the first port above them
#   temp_database NAME       a database of its own: DB, DATABASE_URL
#   start SERVICE [VAR=…]    runs $BIN/SERVICE (generator2, generator3: more generators), its
#                            log and pid file in RUN_DIR, its PID in PID[SERVICE]
#   start_writers [VAR=…]    starts every writer of the list
#   stop / kill9 SERVICE     SIGTERM (waits for the exit) / kill -9
#   wait_ready SERVICE ADDR  its readiness probe, up to 30 s; its log's end on failure
#   rss_kib / rss_mib / open_files PID
#   mesh_teardown            stops what `start` started, drops DB and AMQP_PREFIX's queues
# shellcheck shell=bash
declare -A PID

log() { printf '[%s] %s\n' "${LOG_TAG:-flowmesh}" "$*" >&2; }

mesh_setup() { # NAME
  LOG_TAG=${LOG_TAG:-$1}
  BIN=$(target_dir)/release
  cargo build --release --quiet --bins
  export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
  PG_BASE=${PG_BASE:-postgres://postgres:postgres@127.0.0.1:5432}
  export LOG_FORMAT=json RUST_LOG=${RUST_LOG:-warn}
  WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/flowmesh-$1.XXXXXX")}
  mkdir -p "$WORK"
  RUN_DIR=$WORK
}

services() { # [ROLE]: the list, or only the services of ROLE (generator, filter, writer)
  "$BIN/services" | awk -v role="${1:-}" 'role == "" || $3 == role'
}
# The variable prefix of a service's settings: pg-writer → PG_WRITER.
settings_prefix() { local name=${1^^}; echo "${name//-/_}"; }

mesh_ports() { # BASE: ports below the kernel's ephemeral range, so no outgoing connection holds one
  local base=$1 offset=1 name
  export FILTER_LISTEN=127.0.0.1:$base FILTER_URL=ws://127.0.0.1:$base/ingest
  export FILTER_DATA_DIR="$RUN_DIR/filter"
  # Each service's probe port: BASE+1, BASE+2, … in the list's order (the generator first).
  while read -r name _; do
    export "$(settings_prefix "$name")_HTTP_ADDR=127.0.0.1:$((base + offset))"
    offset=$((offset + 1))
  done < <(services)
  NEXT_PORT=$((base + offset)) # the first port above them, for more generators
}

temp_database() { # NAME
  DB="flowmesh_${1//-/_}_$RANDOM"
  psql "$PG_BASE/postgres" -qc "create database $DB" >/dev/null
  export DATABASE_URL="$PG_BASE/$DB"
}

start() { # SERVICE [env assignments…]
  local name=$1; shift
  env "$@" "$BIN/${name%[0-9]}" >>"$RUN_DIR/$name.log" 2>&1 &
  PID[$name]=$!
  echo "${PID[$name]}" >"$RUN_DIR/$name.pid"
}
start_writers() { # [env assignments…]: every writer of the list
  local name
  for name in $(services writer | cut -d' ' -f1); do start "$name" "$@"; done
}
running() { [ -n "${PID[$1]:-}" ]; }
stop() {
  if running "$1"; then kill -TERM "${PID[$1]}" 2>/dev/null || true; wait "${PID[$1]}" 2>/dev/null || true; fi
  PID[$1]=""
}
kill9() {
  if running "$1"; then kill -9 "${PID[$1]}" 2>/dev/null || true; wait "${PID[$1]}" 2>/dev/null || true; fi
  PID[$1]=""
}
ready() { "$BIN/${1%[0-9]}" --probe-ready --http-addr "$2" >/dev/null 2>&1; }
wait_ready() { # SERVICE ADDR: up to 30 s; on failure the end of the service's log goes to stderr
  for _ in $(seq 150); do ready "$1" "$2" && return 0; sleep 0.2; done
  log "$1 not ready after 30 s; the end of its log:"
  tail -n 20 "$RUN_DIR/$1.log" >&2 || true
  return 1
}

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || true; }
rss_mib() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo "-"; }
open_files() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l || true; }

mesh_teardown() { # the generators first: they wait for acks from a filter still running
  local name
  for name in "${!PID[@]}"; do [[ $name == generator* ]] && stop "$name"; done
  for name in "${!PID[@]}"; do stop "$name"; done
  PID=()
  if [ -n "${DB:-}" ]; then
    psql "$PG_BASE/postgres" -qc "drop database if exists $DB with (force)" >/dev/null 2>&1 || true
  fi
  if [ -n "${AMQP_PREFIX:-}" ]; then
    local q
    for q in $(services writer | cut -d' ' -f1 | sed 's/^/records./') dead-letter; do
      rabbitmqctl -q delete_queue "$AMQP_PREFIX.$q" >/dev/null 2>&1 || true
    done
  fi
}
