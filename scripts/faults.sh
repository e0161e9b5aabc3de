# The faults the chaos suite and the soak inject, and the verify reports they read, shared by
# scripts/chaos.sh, scripts/soak.sh and scripts/spool-check.sh. Sourced after scripts/lib.sh;
# uses the caller's RUN_DIR, WORK, SOURCES, COUNT and DATABASE_URL.
# shellcheck shell=bash
verify_json() { # one JSON report over every source of the scenario (counts summed); the file
  # sinks read are VERIFY_DATA_DIRS (comma-separated) when set, else the one filter's
  local source reports=()
  for source in "${SOURCES[@]}"; do
    reports+=("$("$BIN/verify" --json --source "$source" --expected "$COUNT" --data-dir "${VERIFY_DATA_DIRS:-$RUN_DIR/filter}" \
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
# Waits up to 5 min for generator NAME to exit (it does once every record is acked); sets
# GEN_STATUS: 0, its exit status, or 124 when it still runs.
wait_generator() {
  for _ in $(seq 600); do kill -0 "${PID[$1]}" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "${PID[$1]}" 2>/dev/null; then GEN_STATUS=124
  else GEN_STATUS=0; wait "${PID[$1]}" || GEN_STATUS=$?; fi
  PID[$1]=""
}
# Drains: runs verify until everything reconciles, up to 180 s; sets REPORT (JSON) and OK.
wait_reconciled() {
  REPORT="" OK=False
  for _ in $(seq 360); do
    REPORT=$(verify_json)
    read -r OK _ <<<"$(summary "$REPORT")"
    [ "$OK" = True ] && break
    sleep 0.5
  done
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
