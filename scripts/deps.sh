#!/usr/bin/env bash
# Makes sure RabbitMQ, PostgreSQL and a MongoDB-speaking server are installed and running on this
# machine (Debian), and that the `flowmesh` database exists. Safe to run again and again: it only
# does what is missing. Sourced by run.sh and test.sh; can also be run on its own.
#
# MongoDB: when nothing answers on 127.0.0.1:27017, SecantusDB (a MongoDB-wire-compatible server
# from PyPI, pinned below) is installed into a virtualenv under var/ and started with its data
# in var/mongodb. A real mongod (or `docker compose`, which uses the official image) is used the
# same way: whatever answers on MONGODB_URL is what the services and tests talk to.
set -euo pipefail

log() { printf '[deps] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 name=$2 tries=${3:-120}
  for _ in $(seq "$tries"); do
    port_open "$port" && return 0
    sleep 1
  done
  log "$name did not open port $port"; return 1
}

apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then
    log "apt-get update"
    as_root apt-get update -qq
    apt_updated=1
  fi
  log "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_rabbitmq() {
  if port_open 5672; then return 0; fi
  command -v rabbitmq-server >/dev/null 2>&1 || apt_install rabbitmq-server
  log "starting RabbitMQ"
  as_root rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_port 5672 RabbitMQ 180
  # The broker accepts TCP before it is fully booted; wait until it answers.
  as_root rabbitmqctl await_startup >/dev/null 2>&1 || true
}

ensure_postgres() {
  if ! port_open 5432; then
    command -v pg_ctlcluster >/dev/null 2>&1 || apt_install postgresql
    local version
    version=$(ls /etc/postgresql | sort -V | tail -1)
    log "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null \
      || as_root pg_ctlcluster "$version" main start
    wait_port 5432 PostgreSQL 120
  fi
  # Password-less local access for the flowmesh database, as the postgres superuser.
  if ! psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
    as_root su postgres -c "psql -q -c \"alter user postgres password 'postgres'\"" >/dev/null 2>&1 || true
    export PGPASSWORD=${PGPASSWORD:-postgres}
  fi
  if ! psql -h 127.0.0.1 -U postgres -d postgres -Atc "select 1 from pg_database where datname = 'flowmesh'" | grep -q 1; then
    log "creating database flowmesh"
    psql -h 127.0.0.1 -U postgres -d postgres -qc 'create database flowmesh'
  fi
}

SECANTUS_VERSION=0.7.0b3
MONGODB_DIR=${MONGODB_DIR:-$PWD/var/mongodb}

ensure_mongodb() {
  if port_open 27017; then return 0; fi
  local venv=$PWD/var/secantus-venv
  if [ ! -x "$venv/bin/secantusd-py" ]; then
    python3 -m venv "$venv" >/dev/null 2>&1 || { apt_install python3-venv; python3 -m venv "$venv"; }
    log "installing SecantusDB $SECANTUS_VERSION (MongoDB wire protocol) into $venv"
    "$venv/bin/pip" install --quiet "SecantusDB==$SECANTUS_VERSION"
  fi
  start_secantus
}

# Starts the local SecantusDB on its data directory (also used by the chaos suite to bring it
# back after a kill -9).
start_secantus() {
  local venv=$PWD/var/secantus-venv
  mkdir -p "$MONGODB_DIR/data"
  log "starting SecantusDB on 127.0.0.1:27017 (data in $MONGODB_DIR/data)"
  # Failpoints (configureFailPoint) let the chaos suite make writes fail; the server listens on
  # loopback only. --sync-on-commit makes j:true writes reach the disk, as mongod's journal does.
  setsid nohup "$venv/bin/secantusd-py" --host 127.0.0.1 --port 27017 \
    --storage-path "$MONGODB_DIR/data" --sync-on-commit --enable-test-commands \
    --log-level WARNING >>"$MONGODB_DIR/server.log" 2>&1 < /dev/null &
  echo $! > "$MONGODB_DIR/server.pid"
  wait_port 27017 SecantusDB 120
}

# Where cargo puts its builds (CARGO_TARGET_DIR and cargo's own configuration respected).
target_dir() {
  cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'
}

# The pid of the SecantusDB serving port 27017, whoever started it; fails when there is none.
secantus_pid() {
  local pid
  pid=$(cat "$MONGODB_DIR/server.pid" 2>/dev/null || true)
  if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
    pid=$(ss -Hltnp 'sport = :27017' 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)
  fi
  [ -n "$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q secantusd && echo "$pid"
}

# For the chaos suite: kill -9 the local SecantusDB, remembering its command line (and so its
# data directory) for restart_secantus. Fails when no SecantusDB serves 27017.
kill9_secantus() {
  local pid
  pid=$(secantus_pid) || return 1
  mapfile -d '' SECANTUS_CMD <"/proc/$pid/cmdline"
  kill -9 "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}

# Starts SecantusDB again exactly as it ran before kill9_secantus.
restart_secantus() {
  log "restarting SecantusDB on its data directory"
  mkdir -p "$MONGODB_DIR"
  setsid nohup "${SECANTUS_CMD[@]}" >>"$MONGODB_DIR/server.log" 2>&1 </dev/null &
  echo $! >"$MONGODB_DIR/server.pid"
  wait_port 27017 SecantusDB 120
}

ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    log "cargo not found: install Rust (https://rustup.rs) and run this again"; exit 1
  fi
}

ensure_tools() {
  # python3 runs the protocol client and the chaos suite's bookkeeping; chattr (e2fsprogs)
  # makes the file sink unwritable in the chaos suite.
  command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
  command -v chattr >/dev/null 2>&1 || apt_install e2fsprogs
  command -v psql >/dev/null 2>&1 || apt_install postgresql-client
  # openssl makes the test certificates of scripts/make-certs.sh (and its test).
  command -v openssl >/dev/null 2>&1 || apt_install openssl
  # haproxy runs the shipped haproxy/haproxy.cfg in front of two filters in the tests.
  command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || apt_install haproxy
}

ensure_rust
ensure_tools
ensure_rabbitmq
ensure_postgres
ensure_mongodb
log "RabbitMQ, PostgreSQL and MongoDB are up"
