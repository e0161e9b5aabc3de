#!/usr/bin/env bash
# The mesh on a real three-node RabbitMQ cluster, proven by faults. Two stages:
#
# 1. The whole of docker-compose.cluster.yml in containers (the project's image, the three nodes,
#    PostgreSQL, MongoDB, Prometheus, two filters, pg-writer, two mongo-writers over two
#    partitions and three generators): every service healthy, Prometheus scraping every instance
#    and node, records flowing; then, while they flow: `docker kill` of the node the filter is
#    connected to (its /metrics say which), which it must leave for another; `docker kill` of a
#    filter home to some sources (they fail over, then come home once it is back); `docker kill`
#    of the mongo-writer active on partition 0 (the other stores meanwhile); pg-writers scaled
#    1 → 3 → 1 (`up --scale`). Then the generators stop and `verify` (in a container on the
#    file's network, reading both filters' volumes) must find every record of each source
#    exactly once, records in both filters' files reported apart.
# 2. The faults, each while three sources send: the nodes of the same file in containers
#    (quorum queues with a replica on each), the mesh's own binaries on this machine with
#    AMQP_URL listing the three nodes, so that each fault's records are counted apart; after
#    each, the generators stop and `verify` must find every record exactly once (file,
#    PostgreSQL, MongoDB, MongoDB's nesting per source) and nothing dead-lettered, and the three
#    nodes must run as one cluster again, with no partition recorded, without anyone's help
#    (but a partition RabbitMQ's Mnesia still records after a cut or a pause: see
#    whole_or_restart, which restarts the minority node and says so on the line).
#
#   node-kill        docker kill of the node holding the writer queues' leaders, started after 30 s
#   partition        that node cut from the other two (iptables in its network namespace, cut
#                    and healed in one commit; its clients stay attached) for 30 s and until
#                    pause_minority has paused it
#   node-pause       docker pause of one node for 30 s
#   rolling-restart  each node restarted in turn, once check_if_node_is_quorum_critical allows it
#   two-nodes-down   two nodes killed for 30 s: no quorum, publishes stall, windows hold
#   postgres-frozen  every PostgreSQL process stopped for 30 s (what docker pause does)
#   filter-kill      two filters, each the home of some sources (rendezvous hashing); kill -9 of
#                    one for 15 s: its generators fail over to the other after
#                    GENERATOR_FAILOVER_AFTER (5 s here) and come home once it is back; records
#                    in both filters' files are counted apart (at most a window, 10 000)
#   pg-writers-scale pg-writers 1 → 3 → 1 while records flow: two more started, stopped 15 s later
#
# Each prints one line: records sent, lost, duplicated, in two filters' files (a failover's
# re-sends, not a fault, at most a window), dead-lettered, how long the flow stopped
# (the longest time in which no generator got an ack), when the last ack came, counted from the
# fault, how long the stores took to catch up, and the highest RSS of any service (over
# CLUSTER_RSS_MIB, default 256, fails the fault). Last, `dead-letters`' own tests run against
# the cluster (RabbitMQ 4, whose quorum queues have a default delivery limit).
#
# Skips (exit 0, saying so) when no Docker engine answers. Tears the cluster down (down -v) and
# keeps every node's and service's log under var/cluster-check/. Environment: CLUSTER_RATE
# (records per second per source, default 200), CLUSTER_SECONDS (how long each fault's run
# sends, default 30), CLUSTER_FAULTS (some of the faults, by name; all by default),
# CLUSTER_STAGES (`file faults` by default; either alone).
set -euo pipefail
cd "$(dirname "$0")/.."
LOG_TAG=cluster
source scripts/lib.sh
source scripts/faults.sh

if ! docker info >/dev/null 2>&1; then
  log "SKIPPED: no Docker engine answers (docker info failed)"
  exit 0
fi
if docker compose version >/dev/null 2>&1; then COMPOSE_BIN=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then COMPOSE_BIN=(docker-compose)
else log "SKIPPED: neither 'docker compose' nor 'docker-compose' is installed"; exit 0; fi

# PostgreSQL and the MongoDB server on this machine: the stores. (deps.sh has its own `log`.)
source scripts/deps.sh
source scripts/lib.sh

export COMPOSE_PROJECT_NAME=${CLUSTER_PROJECT:-flowmesh-cluster}
# Node 1's published ports, away from a native RabbitMQ on this machine.
export FLOWMESH_AMQP_PORT=${FLOWMESH_AMQP_PORT:-27672} FLOWMESH_RABBITMQ_UI_PORT=${FLOWMESH_RABBITMQ_UI_PORT:-27673}
NODES=(rabbitmq-1 rabbitmq-2 rabbitmq-3)
LOGS=${CLUSTER_LOGS:-var/cluster-check}
RATE=${CLUSTER_RATE:-200}
SECONDS_PER_RUN=${CLUSTER_SECONDS:-30}
compose() { "${COMPOSE_BIN[@]}" -f docker-compose.cluster.yml "$@"; }
source scripts/compose-lib.sh
container() { cid "$1"; }
GENERATORS=(generator-a generator-b generator-c)
FILE_MESH=(filter filter-2 pg-writer mongo-writer mongo-writer-2 "${GENERATORS[@]}")
FILE_SERVICES=("${NODES[@]}" postgres mongodb "${FILE_MESH[@]}" prometheus)
# The file's host ports, away from the stores and services on this machine.
for setting in POSTGRES:27432 MONGODB:27417 FILTER:27080 FILTER_PROBE:27102 PG_WRITER:27103 \
  MONGO_WRITER:27104 PROMETHEUS:27090; do
  name=FLOWMESH_${setting%%:*}_PORT
  export "$name=${!name:-${setting##*:}}"
done
export GENERATOR_RATE=$RATE
STAGES=${CLUSTER_STAGES:-file faults}
ip_of() { docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$(container "$1")"; }

keep_logs() { # PREFIX: every container's log of the file, under LOGS
  local s
  mkdir -p "$LOGS"
  for s in "${FILE_SERVICES[@]}"; do compose logs --no-color "$s" >"$LOGS/$1$s.log" 2>&1 || true; done
}
teardown() {
  heal_all
  keep_logs ""
  mesh_teardown
  if [ -n "${RUN_DIR:-}" ]; then
    cp "$RUN_DIR"/*.log "$RUN_DIR"/*.flow.json "$LOGS/" 2>/dev/null || true
    rm -rf "$RUN_DIR"
  fi
  compose down -v >/dev/null 2>&1 || true
}
trap teardown EXIT

# A command on a node, bounded: a node stuck in its boot must not stop the check.
on_node() { timeout 30 "${COMPOSE_BIN[@]}" -f docker-compose.cluster.yml exec -T "$@"; }
rabbitmqctl_on() { on_node "$1" rabbitmqctl -q "${@:2}"; }
running_node() { # the first node that answers
  local n
  for n in "${NODES[@]}"; do
    on_node "$n" rabbitmq-diagnostics -q check_running >/dev/null 2>&1 && { echo "$n"; return 0; }
  done
  return 1
}
# The node that holds the leader of the writer queues (the first one listed).
leader_node() {
  rabbitmqctl_on "$(running_node)" list_queues name leader 2>/dev/null |
    awk -v p="$AMQP_PREFIX.records." 'index($1, p) == 1 { sub(/^rabbit@/, "", $2); print $2; exit }'
}
dead_lettered() {
  rabbitmqctl_on "$(running_node)" list_queues name messages 2>/dev/null |
    awk -v q="$AMQP_PREFIX.dead-letter" '$1 == q { print $2 }' | head -1
}
# Waits (up to 180 s) until the three nodes run as one cluster and no partition is recorded:
# after every fault, with no operator's help. Fails the check otherwise.
whole_within() { # SECONDS: 0 once the cluster is whole, 1 (saying what a node sees) if not in time
  local n status tries=$(($1 / 2))
  for _ in $(seq "$tries"); do
    for n in "${NODES[@]}"; do
      status=$(rabbitmqctl_on "$n" cluster_status --formatter json 2>/dev/null) || continue
      python3 -c 'import json, sys
s = json.loads(sys.argv[1])
sys.exit(0 if len(s["running_nodes"]) == 3 and s["partitions"] == {} else 1)' "$status" && return 0
      break
    done
    sleep 2
  done
  log "the cluster is not whole $1 s after the fault: $(python3 -c 'import json, sys
s = json.loads(sys.argv[1] or "{}")
print("running", s.get("running_nodes"), "partitions", s.get("partitions"))' "${status:-}")"
  return 1
}
# Whole within 180 s, or: a node whose container has exited (RabbitMQ 4.0 can crash while
# booting after a kill: `node_not_running` in its log) is started again once, as an operator or a
# supervisor would, the line says so, and the cluster must then be whole within 180 s.
cluster_whole() {
  whole_within 180 && return 0
  local n crashed=()
  for n in "${NODES[@]}"; do
    [ "$(docker inspect -f '{{.State.Running}}' "$(container "$n")" 2>/dev/null)" = true ] && continue
    log "$n is not running (its last log lines: $(docker logs --tail 3 "$(container "$n")" 2>&1 | tr '\n' ' ' | cut -c1-300)); starting it again"
    docker start "$(container "$n")" >/dev/null && crashed+=("$n")
  done
  if [ ${#crashed[@]} -gt 0 ] && whole_within 180; then
    FAULT_NOTE="${crashed[*]} exited while starting and was started again"
    return 0
  fi
  FAULT_FAILED="the cluster did not heal by itself"
}

print_results() {
  printf '\n' >&2
  for line in "${RESULTS[@]}"; do printf '%s\n' "$line" >&2; done
}

# Images: the official ones where a registry answers, the local stand-ins otherwise.
if ! timeout 30 docker pull -q debian:bookworm-slim >/dev/null 2>&1; then
  bash docker/standins/build.sh
fi
RESULTS=()
FAILED=0

#
# Stage 1: the whole file in containers.
#
source scripts/cluster-file.sh
if [[ " $STAGES " == *" file "* ]]; then
  whole_file
fi
[[ " $STAGES " == *" faults "* ]] || { print_results; exit "$FAILED"; }

#
# Stage 2: the faults, the nodes of the file against the mesh's binaries on this machine.
#
compose up -d rabbitmq-cluster >/dev/null
[ "$(docker inspect -f '{{.State.ExitCode}}' "$(container rabbitmq-cluster)")" = 0 ] ||
  { log "the three nodes did not form a cluster"; exit 1; }
URLS=()
for n in "${NODES[@]}"; do URLS+=("amqp://guest:guest@$(ip_of "$n"):5672/%2f"); done
AMQP_URL=$(IFS=,; echo "${URLS[*]}")
export AMQP_URL AMQP_PREFIX=cluster$RANDOM
log "cluster up: ${NODES[*]}"

# The native mesh, pointed at the cluster.
mesh_setup cluster
mesh_ports 23200
temp_database cluster-check
export MONGODB_URL=${MONGODB_URL:-mongodb://127.0.0.1:27017} MONGODB_DATABASE=cluster_$RANDOM
# mongo-writer's queue in two partitions (docs/contracts.md §4), and a second mongo-writer
# standing by for both, for mongo-writer-kill.
export MONGO_PARTITIONS=2
MONGO_WRITER2_HTTP="127.0.0.1:$((NEXT_PORT + 14))"
start filter
start_writers
start mongo-writer2 MONGO_WRITER_HTTP_ADDR="$MONGO_WRITER2_HTTP"
wait_ready filter "$FILTER_HTTP_ADDR"

# The faults: each injects, waits, heals and returns once the cluster is whole again.
VICTIM=""
node_kill() { # the node holding the writer queues' leaders, started again after 30 s
  VICTIM=$(leader_node)
  log "docker kill $VICTIM (leader of the writer queues)"
  docker kill "$(container "$VICTIM")" >/dev/null
  sleep 30
  docker start "$(container "$VICTIM")" >/dev/null
  cluster_whole
}
# NODE -I|-D: drops (or stops dropping) NODE's traffic to and from the two other nodes, inside
# NODE's network namespace: its clients on this machine stay attached. One iptables-restore
# commit, so that the cut and the heal reach both peers in both directions at once (rule by rule,
# the node would see one peer before the other: a partial partition of its own making).
cut_off() {
  local pid peer ip rules="*filter"$'\n'
  pid=$(docker inspect -f '{{.State.Pid}}' "$(container "$1")")
  for peer in "${NODES[@]}"; do
    [ "$peer" != "$1" ] || continue
    ip=$(ip_of "$peer")
    rules+="$2 INPUT -s $ip -j DROP"$'\n'"$2 OUTPUT -d $ip -j DROP"$'\n'
  done
  printf '%sCOMMIT\n' "$rules" | nsenter -t "$pid" -n iptables-restore --noflush
}
# Whole within 90 s, or: RabbitMQ's metadata store (Mnesia) still records a partition after the
# network healed, which nothing in RabbitMQ re-merges (rabbitmq-server#17319: pause_minority
# acts only while a node sees itself in a minority; a partition Mnesia detects as the nodes meet
# again stays). RabbitMQ's documented recovery is to restart the nodes of the side trusted least,
# here VICTIM, the minority; the check does so, as an operator would, and the line says so.
# Quorum queues keep every confirmed message either way (Raft, not Mnesia).
whole_or_restart() { # VICTIM WHY
  whole_within 90 && return 0
  log "$1 stayed outside the cluster $2: restarting it, as an operator would"
  FAULT_NOTE="a partition stayed recorded $2; $1 restarted"
  docker restart -t 60 "$(container "$1")" >/dev/null
  cluster_whole
}
# The leaders' node cut from the other two for 30 s, and for as long as it takes to notice: the
# cut lasts until the node has paused itself (pause_minority), up to 90 s. A node notices a lost
# peer after net_ticktime (15 s) and up to 10 s later on a busy machine; a cut healed before then
# is a blip, not this fault (the node meets its peers again without ever pausing, and Mnesia
# keeps the partition: see whole_or_restart).
partition() {
  VICTIM=$(leader_node)
  log "$VICTIM cut from the other nodes"
  cut_off "$VICTIM" -I
  local cut_at=$SECONDS
  sleep 30
  until ! on_node "$VICTIM" rabbitmq-diagnostics -q check_running >/dev/null 2>&1; do
    [ $((SECONDS - cut_at)) -lt 90 ] || break
    sleep 2
  done
  if on_node "$VICTIM" rabbitmq-diagnostics -q check_running >/dev/null 2>&1; then
    log "$VICTIM did not pause within $((SECONDS - cut_at)) s of the cut"
  else
    log "$VICTIM paused itself (pause_minority); the cut ends after $((SECONDS - cut_at)) s"
  fi
  cut_off "$VICTIM" -D
  whole_or_restart "$VICTIM" "after the network healed"
}
pause_node() { # NODE: docker pause, tried again while the kernel cannot freeze all its processes
  local try
  for try in 1 2 3 4 5; do
    docker pause "$(container "$1")" >/dev/null 2>"$RUN_DIR/pause.err" && return 0
    # runc gives up when a process stays unfreezable (in the middle of I/O) for a moment.
    log "docker pause $1 failed (try $try): $(tr '\n' ' ' <"$RUN_DIR/pause.err")"
    sleep 2
  done
  return 1
}
node_pause() {
  VICTIM=rabbitmq-2
  log "docker pause $VICTIM"
  if ! pause_node "$VICTIM"; then
    FAULT_FAILED="docker pause of $VICTIM failed five times: $(tr '\n' ' ' <"$RUN_DIR/pause.err")"
    whole_or_restart "$VICTIM" "after a failed pause"
    return 0
  fi
  sleep 30
  docker unpause "$(container "$VICTIM")" >/dev/null
  # The others dropped it while it slept; it finds the partition only as it wakes, when it is no
  # longer in a minority, so pause_minority leaves it outside the cluster.
  whole_or_restart "$VICTIM" "after its pause"
}
rolling_restart() { # each node in turn, once it is not critical to any quorum queue's quorum
  local n waited
  for n in "${NODES[@]}"; do
    waited=0
    until on_node "$n" rabbitmq-diagnostics -q check_if_node_is_quorum_critical >/dev/null 2>&1; do
      waited=$((waited + 1))
      [ "$waited" -lt 120 ] || { FAULT_FAILED="$n stayed quorum-critical for 120 s"; return 0; }
      sleep 1
    done
    log "restarting $n (waited ${waited} s for it to be safe to stop)"
    docker restart -t 60 "$(container "$n")" >/dev/null
    for _ in $(seq 60); do
      on_node "$n" rabbitmq-diagnostics -q check_running >/dev/null 2>&1 && break
      sleep 2
    done
  done
  cluster_whole
}
two_nodes_down() { # no quorum for 30 s: publishes stall, the generators' windows hold
  log "docker kill rabbitmq-1 and rabbitmq-3"
  docker kill "$(container rabbitmq-1)" "$(container rabbitmq-3)" >/dev/null
  sleep 30
  docker start "$(container rabbitmq-1)" "$(container rabbitmq-3)" >/dev/null
  cluster_whole
}
postgres_frozen() { # every PostgreSQL process stopped for 30 s (docker pause does the same)
  injected postgres-frozen
  pg_freeze || { FAULT_FAILED="no PostgreSQL process found to freeze"; healed postgres-frozen; return 0; }
  log "PostgreSQL frozen"
  sleep 30
  pg_thaw
  healed postgres-frozen
}

# A second filter, for filter-kill: FILTER2_URL, its data directory beside the first one's.
FILTER2_LISTEN="127.0.0.1:$((NEXT_PORT + 10))" FILTER2_HTTP="127.0.0.1:$((NEXT_PORT + 11))"
FILTER2_URL="ws://$FILTER2_LISTEN/ingest"
filter_kill() { # kill -9 of the filter that is home to the first source, started again after 15 s
  log "kill -9 of the filter at $(home_of "${SOURCES[0]}" "$FILTER_URL" "$FILTER2_URL") (home of ${SOURCES[0]})"
  if [ "$(home_of "${SOURCES[0]}" "$FILTER_URL" "$FILTER2_URL")" = "$FILTER_URL" ]; then
    kill9 filter; sleep 15; start filter
  else
    kill9 filter2; sleep 15
    start filter2 FILTER_LISTEN="$FILTER2_LISTEN" FILTER_HTTP_ADDR="$FILTER2_HTTP" FILTER_DATA_DIR="$RUN_DIR/filter2"
  fi
}
came_home() { # every source's last record is in its own filter's file: it came home
  local src dir
  for src in "${SOURCES[@]}"; do
    dir=filter; [ "$(home_of "$src" "$FILTER_URL" "$FILTER2_URL")" = "$FILTER2_URL" ] && dir=filter2
    python3 - "$RUN_DIR/$dir" "$src" "$COUNT" <<'PY' || FAULT_FAILED="$src did not come back to its own filter ($dir)"
import glob, json, sys
d, source, last = sys.argv[1], sys.argv[2], int(sys.argv[3])
for path in glob.glob(f"{d}/records*.jsonl"):
    for line in open(path):
        r = json.loads(line)
        if r["source"] == source and r["seq"] >= last - 10:
            sys.exit(0)
sys.exit(1)
PY
  done
  [ -n "$FAULT_FAILED" ] || FAULT_NOTE="each source's last records at its own filter"
}
pg_writers_scale() { # 1 → 3 → 1 pg-writers while records flow
  log "pg-writers: 1 → 3"
  start pg-writer2 PG_WRITER_HTTP_ADDR="127.0.0.1:$((NEXT_PORT + 12))"
  start pg-writer3 PG_WRITER_HTTP_ADDR="127.0.0.1:$((NEXT_PORT + 13))"
  sleep 15
  log "pg-writers: 3 → 1"
  stop pg-writer2; stop pg-writer3
}

mongo_writer_kill() { # kill -9 of the mongo-writer active on partition 0; the other takes over
  local a b victim standby standby_addr before after
  a=$(partition_stored "$MONGO_WRITER_HTTP_ADDR" 0) b=$(partition_stored "$MONGO_WRITER2_HTTP" 0)
  sleep 2
  if [ "$(partition_stored "$MONGO_WRITER2_HTTP" 0)" -gt "$b" ] && [ "$(partition_stored "$MONGO_WRITER_HTTP_ADDR" 0)" -eq "$a" ]; then
    victim=mongo-writer2 standby=mongo-writer standby_addr=$MONGO_WRITER_HTTP_ADDR
  else
    victim=mongo-writer standby=mongo-writer2 standby_addr=$MONGO_WRITER2_HTTP
  fi
  before=$(partition_stored "$standby_addr")
  log "kill -9 of $victim (active on partition 0); $standby stands by"
  kill9 "$victim"
  sleep 15
  after=$(partition_stored "$standby_addr")
  if [ "$victim" = mongo-writer ]; then start mongo-writer; else start mongo-writer2 MONGO_WRITER_HTTP_ADDR="$MONGO_WRITER2_HTTP"; fi
  if [ "$after" -gt "$before" ]; then
    FAULT_NOTE="$standby stored $((after - before)) records of the partitions while $victim was away"
  else
    FAULT_FAILED="$standby did not take over"
  fi
}

verify_each_source() { # verify's table and the seqs at fault, per source, into the log
  local source
  for source in "${SOURCES[@]}"; do
    "$BIN/verify" --source "$source" --expected "$COUNT" --data-dir "${VERIFY_DATA_DIRS:-$RUN_DIR/filter}" \
      --database-url "$DATABASE_URL" 2>&1 | sed "s/^/[verify $source] /" >&2 || true
  done
}

RSS_LIMIT=${CLUSTER_RSS_MIB:-256}
run_fault() { # NAME FUNCTION: three sources for SECONDS_PER_RUN, FUNCTION after a quarter of it
  local name=$1 fault=$2 i fault_at sent_done watch
  SOURCES=("$name-a" "$name-b" "$name-c")
  COUNT=$((RATE * SECONDS_PER_RUN))
  FAULT_FAILED=""
  FAULT_NOTE=""
  local generators=() pids=() urls=$FILTER_URL
  VERIFY_DATA_DIRS=""
  if [ "$name" = filter-kill ]; then
    # Two filters; sources picked so that each filter is home to some (the first one's home is
    # the filter killed).
    start filter2 FILTER_LISTEN="$FILTER2_LISTEN" FILTER_HTTP_ADDR="$FILTER2_HTTP" FILTER_DATA_DIR="$RUN_DIR/filter2"
    wait_ready filter2 "$FILTER2_HTTP"
    urls="$FILTER_URL,$FILTER2_URL"
    VERIFY_DATA_DIRS="$RUN_DIR/filter,$RUN_DIR/filter2"
    local n=0
    while [ "$(home_of "$name-$n-a" "$FILTER_URL" "$FILTER2_URL")" = "$(home_of "$name-$n-b" "$FILTER_URL" "$FILTER2_URL")" ]; do
      n=$((n + 1))
    done
    SOURCES=("$name-$n-a" "$name-$n-b" "$name-$n-c")
  fi
  export VERIFY_DATA_DIRS
  for i in 0 1 2; do
    start "generator$i" GENERATOR_SOURCE="${SOURCES[$i]}" GENERATOR_RATE="$RATE" \
      GENERATOR_COUNT="$COUNT" GENERATOR_HTTP_ADDR="127.0.0.1:$((NEXT_PORT + i))" \
      FILTER_URL="$urls" GENERATOR_FAILOVER_AFTER=5s GENERATOR_HOME_CHECK=2s
    generators+=("127.0.0.1:$((NEXT_PORT + i))")
  done
  for i in "${!PID[@]}"; do [ -z "${PID[$i]}" ] || pids+=("$i=${PID[$i]}"); done
  python3 scripts/flow-watch.py "$RUN_DIR/$name.flow.json" --generator "${generators[@]}" --pid "${pids[@]}" &
  watch=$!
  sleep $((SECONDS_PER_RUN / 4))
  fault_at=$(date +%s)
  "$fault"
  local generators_ok=1
  for i in 0 1 2; do wait_generator "generator$i"; [ "$GEN_STATUS" = 0 ] || generators_ok=0; done
  kill -TERM "$watch"; wait "$watch" || true
  sent_done=$(date +%s)
  wait_reconciled
  if [ "$name" = filter-kill ]; then
    came_home
    stop filter2
  fi
  local line
  line=$(REPORT=$REPORT python3 - "$name" "$((COUNT * 3))" "$fault_at" "$(( $(date +%s) - sent_done ))" \
    "$(dead_lettered)" "$RUN_DIR/$name.flow.json" "$RSS_LIMIT" "$generators_ok" "$OK" "$FAULT_FAILED" <<'PY'
import json, os, sys
name, sent, fault_at, caught_up, dead, flow, limit, generators_ok, ok, fault_failed = sys.argv[1:]
r = json.loads(os.environ["REPORT"] or "{}")
w = json.load(open(flow))
stores = [s or {} for k, s in r.items() if k in ("postgresql", "mongodb")]
lost = r.get("lost", "?") if r else "?"
dup = (r["file"]["duplicated"] + sum(s.get("duplicated", 0) for s in stores)) if r else "?"
across = r.get("across_filters", 0) if r else 0
dead = int(dead or 0)
peak = w["peak_rss_mib"]
heavy = {k: v for k, v in peak.items() if v > float(limit)}
last = round(w["last_ack_at"] - float(fault_at)) if w["last_ack_at"] else "-"
# A failover re-sends at most one generator's window (10 000) per source.
def unreconciled(r):
    """What kept verify from reconciling, as counts summed over the sources."""
    if not r:
        return "no report"
    found = [f"{store} {what} {(r.get(store) or {}).get(what, 0)}"
             for store in ("file", "postgresql", "mongodb")
             for what in ("missing", "wrong_place", "bad_hash")
             if (r.get(store) or {}).get(what, 0)]
    if r.get("bad_groups"):
        found.append(f"mongodb bad groups {r['bad_groups']}")
    if r.get("unknown_routes_versions"):
        found.append(f"unknown routes versions {r['unknown_routes_versions']}")
    return ", ".join(found) or "see verify.err"
passed = ok == "True" and dead == 0 and not heavy and generators_ok == "1" and not fault_failed and across <= 3 * 10000
print(f"{name:<16} sent {sent:>6}  lost {lost}  duplicated {dup}  in two filters {across}  dead-lettered {dead}  "
      f"flow stopped {w['longest_stall_s']} s (one source's {w.get('longest_source_stall_s', '?')} s)  last ack {last} s after the fault  "
      f"stores caught up {caught_up} s later  peak RSS {max(peak.values()):.0f} MiB  "
      f"{'ok' if passed else 'FAILED'}"
      + (f" ({fault_failed})" if fault_failed else "")
      + ("" if ok == "True" else f" (verify: {unreconciled(r)})")
      + (f" (over {limit} MiB: {heavy})" if heavy else "")
      + ("" if generators_ok == "1" else " (a generator did not end)"))
PY
)
  [[ $line == *" ok" ]] || FAILED=1
  [ "$OK" = True ] || verify_each_source
  [ -z "$FAULT_NOTE" ] || line+=" ($FAULT_NOTE)"
  RESULTS+=("$line")
  log "$line"
}

# CLUSTER_FAULTS picks some (by name); all by default.
ALL_FAULTS=(node-kill:node_kill partition:partition node-pause:node_pause
  rolling-restart:rolling_restart two-nodes-down:two_nodes_down postgres-frozen:postgres_frozen
  filter-kill:filter_kill pg-writers-scale:pg_writers_scale mongo-writer-kill:mongo_writer_kill)
for entry in "${ALL_FAULTS[@]}"; do
  name=${entry%%:*}
  [[ " ${CLUSTER_FAULTS:-${ALL_FAULTS[*]%%:*}} " == *" $name "* ]] || continue
  run_fault "$name" "${entry#*:}"
done

# dead-letters' own tests, against the cluster: RabbitMQ 4 gives quorum queues a delivery limit
# by default, which a listing must never reach.
# (One node's URL: the tests' own helpers take one; the list is tested by one of them.)
mkdir -p "$LOGS"
if cargo nextest --version >/dev/null 2>&1; then TESTS=(cargo nextest run); else TESTS=(cargo test); fi
# The node's address read now: a node killed and started again may have been given another one.
NODE_URL="amqp://guest:guest@$(ip_of rabbitmq-1):5672/%2f"
if AMQP_URL=$NODE_URL "${TESTS[@]}" --workspace --all-features --test dead_letters \
  >"$LOGS/dead-letters-tests.log" 2>&1; then
  RESULTS+=("dead-letters' tests against the cluster: ok")
else
  RESULTS+=("dead-letters' tests against the cluster: FAILED (var/cluster-check/dead-letters-tests.log)")
  FAILED=1
fi
print_results
exit "$FAILED"
