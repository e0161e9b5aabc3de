#!/usr/bin/env bash
# Runs the mesh natively, scrapes it with a real Prometheus using the project's scrape config
# (targets rewritten to loopback), checks the alert rules (`promtool check rules`, `promtool
# test rules`), lints every /metrics, checks that the Grafana dashboard and the alerts name only
# metrics the services export, and validates docker-compose.yml (`docker-compose config -q`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
# Debian's prometheus package would start a Prometheus server of its own (on :9090) that
# outlives this check: it is installed with service starts denied (policy-rc.d, Debian's way),
# and one started anyway is stopped again. The check runs only its own, on a port of its own.
if ! command -v promtool >/dev/null 2>&1; then
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
    as_root chmod +x /usr/sbin/policy-rc.d
    own_policy=1
  fi
  apt_install prometheus || { [ "$own_policy" = 1 ] && as_root rm -f /usr/sbin/policy-rc.d; exit 1; }
  [ "$own_policy" = 1 ] && as_root rm -f /usr/sbin/policy-rc.d
  if pgrep -x prometheus >/dev/null 2>&1; then
    as_root service prometheus stop >/dev/null 2>&1 || as_root pkill -x prometheus || true
  fi
fi
command -v docker-compose >/dev/null 2>&1 || apt_install docker-compose

echo "[observability] docker-compose config" >&2
docker-compose config -q
echo "[observability] alert rules" >&2
(cd prometheus && promtool check rules alerts.yml && promtool test rules alerts_test.yml)

rabbitmq-plugins enable --quiet rabbitmq_prometheus >/dev/null
cargo build --release --quiet --bins
BIN=$(target_dir)/release
WORK=$(mktemp -d "${TMPDIR:-/tmp}/flowmesh-obs.XXXXXX")
PG_BASE=${PG_BASE:-postgres://postgres:postgres@127.0.0.1:5432}
DB="flowmesh_obs_$RANDOM"
psql "$PG_BASE/postgres" -qc "create database $DB"
export DATABASE_URL="$PG_BASE/$DB" AMQP_PREFIX=flowmesh-obs LOG_FORMAT=json RUST_LOG=warn
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export FILTER_DATA_DIR="$WORK/filter" FILTER_LISTEN=127.0.0.1:27080 FILTER_HTTP_ADDR=127.0.0.1:27102
export GENERATOR_HTTP_ADDR=127.0.0.1:27101 PG_WRITER_HTTP_ADDR=127.0.0.1:27103 MONGO_WRITER_HTTP_ADDR=127.0.0.1:27104
export FILTER_URL=ws://127.0.0.1:27080/ingest GENERATOR_RATE=100 MONGO_WRITER_STORE=memory
pids=()
for s in filter pg-writer mongo-writer generator; do "$BIN/$s" >>"$WORK/$s.log" 2>&1 & pids+=($!); sleep 0.5; done
sed -e 's/generator:9101/127.0.0.1:27101/; s/filter:9102/127.0.0.1:27102/; s/pg-writer:9103/127.0.0.1:27103/' \
    -e 's/mongo-writer:9104/127.0.0.1:27104/; s/rabbitmq:15692/127.0.0.1:15692/' prometheus/prometheus.yml >"$WORK/prometheus.yml"
cp prometheus/alerts.yml "$WORK/"
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
  --web.listen-address=127.0.0.1:29090 >"$WORK/prometheus.log" 2>&1 &
pids+=($!)
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql "$PG_BASE/postgres" -qc "drop database if exists $DB with (force)" >/dev/null 2>&1 || true
  for q in records.pg-writer records.mongo-writer dead-letter; do rabbitmqctl -q delete_queue "$AMQP_PREFIX.$q" >/dev/null 2>&1 || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
# A stop (Ctrl-C, kill) runs the exit trap too.
trap 'exit 130' INT; trap 'exit 143' TERM
sleep 5
python3 tests/observability/check.py http://127.0.0.1:29090 \
  http://127.0.0.1:27101/metrics http://127.0.0.1:27102/metrics http://127.0.0.1:27103/metrics http://127.0.0.1:27104/metrics
