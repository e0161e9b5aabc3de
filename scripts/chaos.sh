#!/usr/bin/env bash
# The chaos suite: runs the real binaries of the whole mesh on the real RabbitMQ and PostgreSQL,
# injects one fault per scenario while records flow, heals it, waits for the mesh to drain, runs
# `verify`, and prints one row per scenario. Exits non-zero if any scenario lost or duplicated a
# record — and also if the self-checks (a row deleted from PostgreSQL, a line deleted from the
# file) were NOT caught, which proves the suite can fail.
#
#   scripts/chaos.sh                 # every scenario
#   scripts/chaos.sh kill-filter     # some of them
#
# Environment: CHAOS_COUNT (records per scenario, default 3000), CHAOS_RATE (per second, 300).
# The services inherit the rest, e.g. FILTER_PUBLISH_PACK=100 runs the scenarios with packed
# RabbitMQ messages: at 300/s frames hold one record, so only the backlog a filter or RabbitMQ
# fault leaves travels packed; at CHAOS_RATE=3000 every scenario's traffic partly does.
# MongoDB is the one deps.sh started (MONGODB_URL, default mongodb://127.0.0.1:27017); an empty
# MONGODB_URL runs mongo-writer on its in-memory store, which verify cannot read.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
export MONGODB_URL=${MONGODB_URL-mongodb://127.0.0.1:27017}

ALL=(kill-generator kill-filter kill-pg-writer kill-mongo-writer rabbitmq-restart postgres-down-30s
     postgres-down-restarts postgres-frozen-30s file-unwritable-30s mongodb-restart mongodb-failing-30s
     mongodb-down-restarts two-sources-kill-mongo-writer slow-consumer self-check-deleted-row
     self-check-deleted-line)
SCENARIOS=("$@")
[ ${#SCENARIOS[@]} -eq 0 ] && SCENARIOS=("${ALL[@]}")

COUNT=${CHAOS_COUNT:-3000}
RATE=${CHAOS_RATE:-300}
BIN=$(target_dir)/release
cargo build --release --quiet --bins

export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
PG_BASE=${PG_BASE:-postgres://postgres:postgres@127.0.0.1:5432}
export LOG_FORMAT=json RUST_LOG=${RUST_LOG:-info}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/flowmesh-chaos.XXXXXX")
RESULTS="$WORK/results.tsv"
: >"$RESULTS"
declare -A PID

log() { printf '[chaos] %s\n' "$*" >&2; }
now() { date +%s.%N; }

start() { # start SERVICE [extra env assignments…]; generator2 is a second generator
  local name=$1; shift
  env "$@" "$BIN/${name%2}" >>"$RUN_DIR/$name.log" 2>&1 &
  PID[$name]=$!
}
kill9() { kill -9 "${PID[$1]}" 2>/dev/null || true; wait "${PID[$1]}" 2>/dev/null || true; }
stop() { kill -TERM "${PID[$1]}" 2>/dev/null || true; wait "${PID[$1]}" 2>/dev/null || true; }
ready() { "$BIN/$1" --probe-ready --http-addr "$2" >/dev/null 2>&1; }
wait_ready() { # SERVICE ADDR: up to 30 s; on failure the end of the service's log goes to stderr
  for _ in $(seq 150); do ready "$1" "$2" && return 0; sleep 0.2; done
  log "$1 not ready after 30 s; the end of its log:"
  tail -n 20 "$RUN_DIR/$1.log" >&2 || true
  return 1
}

verify_json() { # one JSON report over every source of the scenario (counts summed)
  local source reports=()
  for source in "${SOURCES[@]}"; do
    reports+=("$("$BIN/verify" --json --source "$source" --expected "$COUNT" --data-dir "$RUN_DIR/filter" \
      --database-url "$DATABASE_URL" 2>>"$RUN_DIR/verify.err" || true)")
  done
  python3 - "${reports[@]}" <<'PY'
import json, sys
def merge(a, b):
    if isinstance(a, dict):
        return {k: merge(a[k], b.get(k)) for k in a}
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) and bool(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a + b
    return a
try:
    reports = [json.loads(r) for r in sys.argv[1:]]
except ValueError:
    reports = []
merged = reports[0] if reports else {}
for r in reports[1:]:
    merged = merge(merged, r)
print(json.dumps(merged) if reports and len(reports) == len(sys.argv) - 1 else "{}")
PY
}
# One line of words from a verify report (JSON, passed as data): ok lost duplicated file
# postgresql mongodb.
summary() {
  python3 - "$1" <<'PY'
import json, sys
try:
    d = json.loads(sys.argv[1] or "{}")
except ValueError:
    d = {}
if not d:
    print("False - - - - -")
    sys.exit()
m = d.get("mongodb") or {}
print(d.get("ok", False),
      d["lost"] + d["postgresql"]["missing"] + m.get("missing", 0),
      d["file"]["duplicated"] + d["postgresql"]["duplicated"] + m.get("duplicated", 0),
      d["file"]["records"], d["postgresql"]["records"],
      m["records"] if d.get("mongodb") else "n/a")
PY
}

# The faults injected and not healed yet. The exit trap heals them, so an interrupted run leaves
# RabbitMQ, PostgreSQL, MongoDB and the files as it found them.
UNHEALED=()
injected() { UNHEALED+=("$1"); }
healed() {
  local kept=() fault
  for fault in "${UNHEALED[@]}"; do [ "$fault" = "$1" ] || kept+=("$fault"); done
  UNHEALED=("${kept[@]}")
}
heal_all() {
  local fault
  for fault in "${UNHEALED[@]}"; do
    log "healing $fault, left injected by an interrupted scenario"
    case $fault in
      rabbitmq) rabbitmqctl -q start_app || true; rabbitmqctl -q await_startup || true ;;
      postgres-frozen) pg_thaw || true ;;
      postgres) pg_start || true ;;
      files) chattr -R -i "$WORK" 2>/dev/null || true ;;
      mongodb) restart_secantus || true ;;
      failpoint) mongo_failpoint '"off"' || true ;;
    esac
  done
  UNHEALED=()
}

setup() {
  local scenario=$1 n=$2
  RUN_DIR="$WORK/$scenario"; mkdir -p "$RUN_DIR"
  SOURCE="chaos-$scenario-$RANDOM"
  SOURCES=("$SOURCE")
  local base=$((21000 + n * 10))
  export AMQP_PREFIX="flowmesh-chaos-$scenario"
  export FILTER_DATA_DIR="$RUN_DIR/filter" FILTER_LISTEN=127.0.0.1:$base FILTER_HTTP_ADDR=127.0.0.1:$((base + 2))
  export GENERATOR_HTTP_ADDR=127.0.0.1:$((base + 1)) PG_WRITER_HTTP_ADDR=127.0.0.1:$((base + 3))
  export MONGO_WRITER_HTTP_ADDR=127.0.0.1:$((base + 4)) FILTER_URL=ws://127.0.0.1:$base/ingest
  export GENERATOR_SPOOL_DIR="$RUN_DIR/spool" GENERATOR_SOURCE="$SOURCE" GENERATOR_COUNT=$COUNT GENERATOR_RATE=$RATE
  export GENERATOR_BREAKER_MAX_OPEN_WAIT=5s FILTER_BREAKER_MAX_OPEN_WAIT=5s
  export PG_WRITER_BREAKER_MAX_OPEN_WAIT=5s MONGO_WRITER_BREAKER_MAX_OPEN_WAIT=5s
  if [ -z "${MONGODB_URL:-}" ]; then
    export MONGO_WRITER_STORE=memory MONGO_WRITER_MEMORY_FAIL_WHILE="$RUN_DIR/mongodb-down"
  fi
  DB="flowmesh_chaos_${scenario//-/_}_$RANDOM"
  psql "$PG_BASE/postgres" -qc "create database $DB" >/dev/null
  export DATABASE_URL="$PG_BASE/$DB"
}

teardown() {
  for name in generator generator2 filter pg-writer mongo-writer; do [ -n "${PID[$name]:-}" ] && stop "$name"; done
  PID=()
  psql "$PG_BASE/postgres" -qc "drop database if exists $DB with (force)" >/dev/null 2>&1 || true
  for q in records.pg-writer records.mongo-writer dead-letter; do
    rabbitmqctl -q delete_queue "$AMQP_PREFIX.$q" >/dev/null 2>&1 || true
  done
}

pg_version() { ls /etc/postgresql | sort -V | tail -1; }
# Every process of the PostgreSQL server on 5432: the postmaster and its children.
pg_pids() {
  local postmaster
  postmaster=$(ss -Hltnp 'sport = :5432' 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)
  [ -n "$postmaster" ] && echo "$postmaster" $(pgrep -P "$postmaster")
}
FROZEN_PIDS=""
pg_freeze() { FROZEN_PIDS=$(pg_pids); [ -n "$FROZEN_PIDS" ] && kill -STOP $FROZEN_PIDS; }
pg_thaw() { [ -n "$FROZEN_PIDS" ] && kill -CONT $FROZEN_PIDS 2>/dev/null; FROZEN_PIDS=""; }
pg_stop() { pg_ctlcluster --skip-systemctl-redirect "$(pg_version)" main stop -m fast 2>/dev/null || pg_ctlcluster "$(pg_version)" main stop -m fast; }
pg_start() { pg_ctlcluster --skip-systemctl-redirect "$(pg_version)" main start 2>/dev/null || pg_ctlcluster "$(pg_version)" main start; }

# Restarts SERVICE 8 times, 6 s apart, alternating SIGTERM and kill -9 (an operator, a rolling
# deploy, a crash loop) while its database is away.
restart_often() {
  local i
  for i in 1 2 3 4 5 6 7 8; do
    sleep 6
    if [ $((i % 2)) = 1 ]; then stop "$1"; else kill9 "$1"; fi
    start "$1"
  done
}

dead_letters() { # messages in this scenario's dead-letter queue
  rabbitmqctl -q list_queues name messages 2>/dev/null \
    | awk -v q="$AMQP_PREFIX.dead-letter" '$1 == q { print $2 }' | head -1
}

mongo_failpoint() { # MODE (JSON): arms or disarms failCommand on the writer's commands
  # pymongo comes with SecantusDB: use the Python that runs the local server.
  local pid python
  pid=$(secantus_pid) || { log "no local SecantusDB: no failpoint armed"; return 1; }
  python=$(tr '\0' '\n' <"/proc/$pid/cmdline" | head -1)
  "$python" - "$MONGODB_URL" "$1" <<'PY'
import json, sys
from pymongo import MongoClient
mode = json.loads(sys.argv[2])
MongoClient(sys.argv[1]).admin.command({
    "configureFailPoint": "failCommand", "mode": mode,
    "data": {"failCommands": ["insert", "update", "find"], "errorCode": 91}})
PY
}

# Each fault injects, waits, heals (restarting what it killed). Runs while records flow.
fault() {
  case $1 in
    kill-generator)    kill9 generator; sleep 1; start generator ;;
    kill-filter)       kill9 filter; sleep 2; start filter ;;
    kill-pg-writer)    kill9 pg-writer; sleep 2; start pg-writer ;;
    kill-mongo-writer) kill9 mongo-writer; sleep 2; start mongo-writer ;;
    two-sources-kill-mongo-writer)
      # Two generators (two sources) interleave in the writer's queue; mongo-writer is killed
      # three times while they run. Groups must never mix sources and must follow the rule
      # per source (verify checks both).
      for _ in 1 2 3; do kill9 mongo-writer; sleep 1; start mongo-writer; sleep 3; done ;;
    rabbitmq-restart)
      injected rabbitmq; rabbitmqctl -q stop_app; sleep 5
      rabbitmqctl -q start_app; rabbitmqctl -q await_startup; healed rabbitmq ;;
    postgres-down-30s) injected postgres; pg_stop; sleep 30; pg_start; healed postgres ;;
    postgres-down-restarts)
      # PostgreSQL away for about a minute while pg-writer is restarted 8 times: a writer that
      # takes messages only while its store can write returns none of them, so none reach the
      # delivery limit and the dead-letter queue stays empty.
      injected postgres; pg_stop; restart_often pg-writer; sleep 6; pg_start; healed postgres ;;
    postgres-frozen-30s)
      # The whole server frozen, as `docker pause` does: its processes stopped, its connections
      # open, nothing answering. pg-writer's calls end at their deadline; stopped meanwhile, it
      # must still exit within its grace period (20 s).
      injected postgres-frozen; pg_freeze || { SKIPPED="no PostgreSQL process found to freeze"; healed postgres-frozen; return 0; }
      sleep 12
      local stopping; stopping=$(date +%s)
      kill -TERM "${PID[pg-writer]}" 2>/dev/null || true
      # Waited for 40 s at most: a writer that hangs would otherwise wait for the thaw that
      # comes only after it.
      for _ in $(seq 200); do kill -0 "${PID[pg-writer]}" 2>/dev/null || break; sleep 0.2; done
      local took=$(( $(date +%s) - stopping ))
      if kill -0 "${PID[pg-writer]}" 2>/dev/null; then
        FAULT_FAILED="pg-writer did not stop within 40 s during the freeze"; kill9 pg-writer
      else
        wait "${PID[pg-writer]}" 2>/dev/null || true
        log "pg-writer stopped during the freeze in ${took} s"
        [ "$took" -le 22 ] || FAULT_FAILED="pg-writer took ${took} s to stop during the freeze"
      fi
      start pg-writer
      sleep 18; pg_thaw; healed postgres-frozen ;;
    file-unwritable-30s)
      # Immutable files refuse writes even to open descriptors and even for root.
      injected files; chattr +i "$FILTER_DATA_DIR" "$FILTER_DATA_DIR"/* ; sleep 30
      chattr -i "$FILTER_DATA_DIR" "$FILTER_DATA_DIR"/*; healed files ;;
    mongodb-restart)
      # kill -9 the local server, then start it again on the same data directory.
      if [ -z "${MONGODB_URL:-}" ]; then touch "$RUN_DIR/mongodb-down"; sleep 5; rm -f "$RUN_DIR/mongodb-down"
      elif secantus_pid >/dev/null; then
        injected mongodb; kill9_secantus; sleep 5; restart_secantus; healed mongodb
      else SKIPPED="no local MongoDB server this suite can kill (a real mongod?)"; fi ;;
    mongodb-down-restarts)
      if [ -z "${MONGODB_URL:-}" ]; then
        touch "$RUN_DIR/mongodb-down"; restart_often mongo-writer; sleep 6; rm -f "$RUN_DIR/mongodb-down"
      elif secantus_pid >/dev/null; then
        injected mongodb; kill9_secantus; restart_often mongo-writer; sleep 6; restart_secantus; healed mongodb
      else SKIPPED="no local MongoDB server this suite can kill (a real mongod?)"; fi ;;
    mongodb-failing-30s)
      # A failpoint makes every write and read of the writer fail (a transient error) for 30 s.
      if [ -z "${MONGODB_URL:-}" ]; then touch "$RUN_DIR/mongodb-down"; sleep 30; rm -f "$RUN_DIR/mongodb-down"
      elif secantus_pid >/dev/null; then
        injected failpoint; mongo_failpoint '{"times": 100000}'; sleep 30; mongo_failpoint '"off"'; healed failpoint
      else SKIPPED="no local MongoDB server to arm a failpoint on (a real mongod?)"; fi ;;
    slow-consumer|self-check-*) sleep 3 ;;
  esac
}

run() {
  local scenario=$1 n=$2
  setup "$scenario" "$n"
  log "scenario $scenario: $COUNT records at $RATE/s, source $SOURCE"
  local pg_env=()
  [ "$scenario" = slow-consumer ] && pg_env=(PG_WRITER_PREFETCH=10 PG_WRITER_BATCH_MAX=10 PG_WRITER_LINGER=100ms)
  start filter; start pg-writer "${pg_env[@]}"; start mongo-writer
  if ! wait_ready filter "$FILTER_HTTP_ADDR"; then
    printf '%s\t%s\t-\t-\t-\t-\t-\t-\t-\t-\tFAILED (filter never ready)\n' "$scenario" "$COUNT" >>"$RESULTS"
    teardown; return 0
  fi
  start generator
  if [ "$scenario" = two-sources-kill-mongo-writer ]; then
    SOURCES+=("$SOURCE-b")
    start generator2 GENERATOR_SOURCE="$SOURCE-b" GENERATOR_SPOOL_DIR="$RUN_DIR/spool-b" \
      GENERATOR_HTTP_ADDR="127.0.0.1:$((21000 + n * 10 + 5))"
  fi
  sleep 3
  SKIPPED="" FAULT_FAILED=""
  fault "$scenario"
  local healed; healed=$(now)
  # The generator exits 0 once every one of the COUNT records is acked.
  local gen_status=0
  for _ in $(seq 600); do kill -0 "${PID[generator]}" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "${PID[generator]}" 2>/dev/null; then gen_status=124; else wait "${PID[generator]}" || gen_status=$?; fi
  PID[generator]=""
  if [ -n "${PID[generator2]:-}" ]; then
    for _ in $(seq 600); do kill -0 "${PID[generator2]}" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "${PID[generator2]}" 2>/dev/null; then gen_status=124; else wait "${PID[generator2]}" || gen_status=$?; fi
    PID[generator2]=""
  fi
  # Drain: wait until everything reconciles (or give up after 180 s).
  local report="" ok=False
  for _ in $(seq 360); do
    report=$(verify_json)
    read -r ok _ <<<"$(summary "$report")"
    [ "$ok" = True ] && break
    sleep 0.5
  done
  local recovered
  recovered=$(python3 -c 'import sys; print(f"{float(sys.argv[1]) - float(sys.argv[2]):.1f}")' "$(now)" "$healed")
  local expect_failure=no
  case $scenario in
    self-check-deleted-row)
      psql "$DATABASE_URL" -qc "delete from records where seq = (select min(seq) from records)" >/dev/null
      expect_failure=yes; report=$(verify_json) ;;
    self-check-deleted-line)
      sed -i '5d' "$FILTER_DATA_DIR/records.jsonl"
      expect_failure=yes; report=$(verify_json) ;;
  esac
  local lost dup file pg mongo acked result dead
  read -r ok lost dup file pg mongo <<<"$(summary "$report")"
  dead=$(dead_letters); dead=${dead:-0}
  acked=$([ "$gen_status" = 0 ] && echo $((COUNT * ${#SOURCES[@]})) || echo "exit $gen_status")
  if [ "$expect_failure" = yes ]; then
    result=$([ "$ok" = False ] && [ "$lost" -ge 1 ] 2>/dev/null && echo "caught" || echo "NOT CAUGHT")
    recovered="-"
  elif [ -n "$FAULT_FAILED" ]; then
    result="FAILED ($FAULT_FAILED)"
  elif [ -n "$SKIPPED" ]; then
    # Nothing was injected: the run proves nothing about this fault, so it does not say ok.
    result="SKIPPED ($SKIPPED)"
  else
    result=$([ "$ok" = True ] && [ "$gen_status" = 0 ] && [ "$dead" = 0 ] && echo "ok" || echo "FAILED")
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$scenario" "$((COUNT * ${#SOURCES[@]}))" "$acked" "$file" "$pg" "$mongo" "$lost" "$dup" "$dead" "$recovered" "$result" >>"$RESULTS"
  log "scenario $scenario: $result"
  # What the filter running at the end published: messages, and the records they carried.
  curl -fsS "http://$FILTER_HTTP_ADDR/metrics" 2>/dev/null | awk -v s="$scenario" '
    $1 == "flowmesh_filter_publish_message_records_count" { m = $2 }
    $1 == "flowmesh_filter_publish_message_records_sum" { r = $2 }
    END { if (m != "") printf "[chaos] scenario %s: the last filter published %d records in %d messages\n", s, r, m }' >&2 || true
  teardown
}

trap 'heal_all; teardown 2>/dev/null || true; chattr -R -i "$WORK" 2>/dev/null || true' EXIT
# A stop (Ctrl-C, kill) runs the exit trap too.
trap 'exit 130' INT; trap 'exit 143' TERM
n=0
for scenario in "${SCENARIOS[@]}"; do
  n=$((n + 1))
  run "$scenario" "$n"
done

echo
printf '%-30s %9s %7s %6s %10s %8s %5s %10s %13s %11s  %s\n' scenario generated acked file postgresql mongodb lost duplicated dead_lettered recovery_s result
failed=0; passed=0; skipped=0
while IFS=$'\t' read -r s g a f p m l d x r res; do
  printf '%-30s %9s %7s %6s %10s %8s %5s %10s %13s %11s  %s\n' "$s" "$g" "$a" "$f" "$p" "$m" "$l" "$d" "$x" "$r" "$res"
  case $res in
    ok|caught) passed=$((passed + 1)) ;;
    SKIPPED*) skipped=$((skipped + 1)) ;;
    *) failed=$((failed + 1)) ;;
  esac
done <"$RESULTS"
[ -z "${MONGODB_URL:-}" ] && echo "(mongodb: n/a — MONGODB_URL empty; mongo-writer ran on its in-memory store, which verify cannot read)"
echo "logs: $WORK"
echo "chaos: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
