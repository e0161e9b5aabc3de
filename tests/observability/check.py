"""Checks the observability of a running flowmesh against a real Prometheus.

Usage: check.py PROMETHEUS_URL METRICS_URL...

- every service's /metrics passes `promtool check metrics`;
- every scrape target of the project's config is up, and the key series have samples;
- every metric a Grafana panel or an alert rule names is really exported (read from the live
  /metrics of the services, and from Prometheus for RabbitMQ's own metrics).
"""

import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request

PROM, METRICS = sys.argv[1], sys.argv[2:]
failures, checks = [], []


def check(name, ok, detail=""):
    checks.append(name)
    print(f"{'ok  ' if ok else 'FAIL'} {name}{'' if ok else ': ' + str(detail)}")
    if not ok:
        failures.append(name)


def get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def query(expr):
    url = f"{PROM}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    return json.loads(get(url))["data"]["result"]


exported = set()
for url in METRICS:
    text = get(url)
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    check(f"promtool check metrics {url}", lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr)
    for line in text.splitlines():
        if line and not line.startswith("#"):
            exported.add(re.split(r"[{ ]", line, maxsplit=1)[0])

deadline = time.time() + 90
targets = []
while time.time() < deadline:
    targets = json.loads(get(f"{PROM}/api/v1/targets"))["data"]["activeTargets"]
    if targets and all(t["health"] == "up" for t in targets):
        break
    time.sleep(2)
for target in targets:
    check(f"target {target['labels']['job']} is up", target["health"] == "up", target.get("lastError"))
check("every job of the scrape config has a target", len(targets) == 5, [t["labels"]["job"] for t in targets])

for series in [
    "flowmesh_generator_records_generated_total",
    "flowmesh_filter_records_received_total",
    'flowmesh_writer_records_total{outcome="stored"}',
    "flowmesh_circuit_breaker_state",
    "flowmesh_writer_end_to_end_latency_seconds_bucket",
    "rabbitmq_detailed_queue_messages",
]:
    deadline = time.time() + 60
    result = []
    while time.time() < deadline and not result:
        result = query(series)
        if not result:
            time.sleep(2)
    check(f"Prometheus has samples of {series}", bool(result))

named = set()
dashboard = json.load(open("grafana/dashboards/flowmesh-overview.json"))
for panel in dashboard["panels"]:
    for target in panel.get("targets", []):
        named.update(re.findall(r"\b(?:flowmesh|rabbitmq)_[a-z0-9_]+", target.get("expr", "")))
named.update(re.findall(r"\b(?:flowmesh|rabbitmq)_[a-z0-9_]+", open("prometheus/alerts.yml").read()))
for name in sorted(named):
    if name.startswith("flowmesh_"):
        check(f"{name} is exported by a service", name in exported)
    else:
        check(f"{name} is exported by RabbitMQ", bool(query(name)))

print(f"observability: {len(checks) - len(failures)} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
