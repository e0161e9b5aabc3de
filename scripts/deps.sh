#!/usr/bin/env bash
# Makes sure RabbitMQ and PostgreSQL are installed and running on this machine (Debian), and
# that the `flowmesh` database exists. Safe to run again and again: it only does what is missing.
# Sourced by run.sh and test.sh; can also be run on its own.
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
}

ensure_rust
ensure_tools
ensure_rabbitmq
ensure_postgres
log "RabbitMQ and PostgreSQL are up"
