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
source scripts/lib.sh
mesh_setup obs
export AMQP_PREFIX=flowmesh-obs GENERATOR_RATE=100 MONGO_WRITER_STORE=memory
mesh_ports 27100
temp_database obs
start filter; start_writers; sleep 1; start generator
# The scrape config with every service's target (from the one list) moved to its loopback port.
targets=() urls=()
while read -r name port _; do
  addr_var="$(settings_prefix "$name")_HTTP_ADDR"
  targets+=(-e "s/\"$name:$port\"/\"${!addr_var}\"/") urls+=("http://${!addr_var}/metrics")
done < <(services)
sed "${targets[@]}" -e 's/rabbitmq:15692/127.0.0.1:15692/' prometheus/prometheus.yml >"$WORK/prometheus.yml"
cp prometheus/alerts.yml "$WORK/"
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
  --web.listen-address=127.0.0.1:29090 >"$WORK/prometheus.log" 2>&1 &
PID[prometheus]=$!
cleanup() { mesh_teardown; rm -rf "$WORK"; }
trap cleanup EXIT
# A stop (Ctrl-C, kill) runs the exit trap too.
trap 'exit 130' INT; trap 'exit 143' TERM
sleep 5
python3 tests/observability/check.py http://127.0.0.1:29090 "${urls[@]}"
