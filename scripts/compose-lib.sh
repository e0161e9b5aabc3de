# What the checks that run a compose file for real share (scripts/compose-check.sh for
# docker-compose.yml, scripts/cluster-check.sh for docker-compose.cluster.yml). The caller
# defines `compose` (its files) and `log`.
#
#   cid SERVICE                 the container of a service
#   healthy SECONDS SERVICE…    each service with a healthcheck healthy, the others running
#   generator_acked ADDR        records a generator has had acked (its /metrics at ADDR)
#   generated SERVICE           the highest seq a generator container made (from its log)
#   verify_in_container SOURCE N  `verify` in a container on the file's network and volumes
#                               (VERIFY_IN: the service and command words, `filter verify` by default)
#   targets_up MIN              Prometheus (FLOWMESH_PROMETHEUS_PORT) scrapes ≥ MIN targets, all up
#   json_logs SERVICE…          every line each mesh service wrote is JSON naming the service
# shellcheck shell=bash

cid() { compose ps -q "$1"; }

healthy() { # SECONDS SERVICE…
  local deadline=$((SECONDS + $1)) pending service id status
  shift
  while :; do
    pending=()
    for service in "$@"; do
      id=$(cid "$service")
      status=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id" 2>/dev/null || echo missing)
      case $status in healthy | running) ;; *) pending+=("$service:$status") ;; esac
    done
    [ ${#pending[@]} -eq 0 ] && return 0
    if [ "$SECONDS" -ge "$deadline" ]; then log "not healthy: ${pending[*]}"; return 1; fi
    sleep 3
  done
}

generator_acked() { # ADDR: the generator's own counter (0 while it cannot be reached)
  curl -fsS --max-time 5 "http://$1/metrics" 2>/dev/null \
    | awk '$1 == "flowmesh_generator_records_acked_total" { v = $2 } END { printf "%d\n", v }'
}

generated() { # SERVICE: last spool recovery + what its last run made; fails if any stayed unacked
  docker logs "$(cid "$1")" 2>&1 | python3 -c '
import json, sys
last, made, unacked = 0, None, None
for line in sys.stdin:
    try:
        event = json.loads(line)
    except ValueError:
        continue
    fields = event.get("fields", event)
    message = fields.get("message", "")
    if message.startswith("spool recovered"):
        last, made = int(fields.get("last_seq", 0)), None
    elif message == "generator stopped":
        made, unacked = int(fields["generated"]), int(fields["unacked"])
if made is None:
    sys.exit("the generator logged no \"generator stopped\" line")
if unacked:
    sys.exit(f"the generator stopped with {unacked} records unacked")
print(last + made)'
}

# verify runs in the filter's container (its volume), or as VERIFY_IN says (a service and its
# command words, e.g. the cluster file's `verify`, which reads both filters' volumes).
verify_in_container() { # SOURCE N: until the writers caught up (120 s); MongoDB must be checked
  local deadline=$((SECONDS + 120)) out
  while :; do
    # shellcheck disable=SC2086 # a service and its command words
    if out=$(compose run --rm --no-deps -T ${VERIFY_IN:-filter verify} --source "$1" --expected "$2" 2>&1); then
      printf '%s\n' "$out" | sed "s/^/[verify $1] /" >&2
      grep -q '^mongodb .*skipped' <<<"$out" && { log "verify skipped MongoDB"; return 1; }
      return 0
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      printf '%s\n' "$out" | sed "s/^/[verify $1] /" >&2
      return 1
    fi
    sleep 5
  done
}

targets_up() { # MIN
  local deadline=$((SECONDS + 90))
  while :; do
    if curl -fsS "http://127.0.0.1:$FLOWMESH_PROMETHEUS_PORT/api/v1/targets" 2>/dev/null | python3 -c '
import json, sys
targets = json.load(sys.stdin)["data"]["activeTargets"]
down = [t["labels"]["job"] + "/" + t["labels"]["instance"] + "=" + t["health"] for t in targets if t["health"] != "up"]
print(f"{len(targets)} targets, down: {down}", file=sys.stderr)
sys.exit(1 if down or len(targets) < int(sys.argv[1]) else 0)' "$1"; then
      return 0
    fi
    [ "$SECONDS" -ge "$deadline" ] && return 1
    sleep 5
  done
}

json_logs() { # SERVICE… (the compose service; the service name in its lines is the command's)
  local service bad=0
  for service in "$@"; do
    docker logs "$(cid "$service")" 2>&1 | python3 -c '
import json, sys
service, lines, bad = sys.argv[1], 0, []
# A second instance (filter-2) or a named generator (generator-a) runs the service before the dash.
head, _, tail = service.rpartition("-")
name = head if service.startswith("generator-") or tail.isdigit() else service
for line in sys.stdin:
    lines += 1
    try:
        event = json.loads(line)
        ok = isinstance(event, dict) and event.get("service") == name
    except ValueError:
        ok = False
    if not ok:
        bad.append(line.rstrip()[:200])
print(f"{service}: {lines} lines, {len(bad)} not JSON with service={name}", file=sys.stderr)
for line in bad[:5]:
    print(f"  {line}", file=sys.stderr)
sys.exit(1 if bad or lines == 0 else 0)' "$service" || bad=1
  done
  return "$bad"
}
