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
# Environment: CHAOS_COUNT (records per scenario, default 3000), CHAOS_RATE (per second, 300),
# CHAOS_TRACED (scenarios whose services export every span to an OTLP receiver of their own, then
# checked by tests/traces/retried.py: a record retried across the fault shows both attempts;
# default rabbitmq-restart, empty for none).
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
TRACED=" ${CHAOS_TRACED-rabbitmq-restart} "
export RUST_LOG=${RUST_LOG:-info}
source scripts/lib.sh
mesh_setup chaos
RESULTS="$WORK/results.tsv"
: >"$RESULTS"
now() { date +%s.%N; }
source scripts/faults.sh

setup() {
  local scenario=$1 n=$2
  RUN_DIR="$WORK/$scenario"; mkdir -p "$RUN_DIR"
  SOURCE="chaos-$scenario-$RANDOM"
  SOURCES=("$SOURCE")
  export AMQP_PREFIX="flowmesh-chaos-$scenario"
  mesh_ports $((21000 + n * 10))
  export GENERATOR_SPOOL_DIR="$RUN_DIR/spool" GENERATOR_SOURCE="$SOURCE" GENERATOR_COUNT=$COUNT GENERATOR_RATE=$RATE
  export GENERATOR_BREAKER_MAX_OPEN_WAIT=5s FILTER_BREAKER_MAX_OPEN_WAIT=5s
  export PG_WRITER_BREAKER_MAX_OPEN_WAIT=5s MONGO_WRITER_BREAKER_MAX_OPEN_WAIT=5s
  if [ -z "${MONGODB_URL:-}" ]; then
    export MONGO_WRITER_STORE=memory MONGO_WRITER_MEMORY_FAIL_WHILE="$RUN_DIR/mongodb-down"
  fi
  temp_database "chaos_$scenario"
  unset OTEL_EXPORTER_OTLP_ENDPOINT OTEL_BSP_SCHEDULE_DELAY OTEL_BSP_MAX_QUEUE_SIZE OTEL_TRACES_SAMPLER
  [[ $TRACED == *" $scenario "* ]] && traces_start
  return 0
}

traces_start() { # an OTLP receiver for this scenario; the services started next export to it
  "$BIN/bench" receiver --spans "$RUN_DIR/spans.jsonl" >"$RUN_DIR/receiver.out" 2>&1 &
  PID[receiver]=$!
  for _ in $(seq 100); do [ -s "$RUN_DIR/receiver.out" ] && break; sleep 0.1; done
  OTEL_EXPORTER_OTLP_ENDPOINT=$(head -1 "$RUN_DIR/receiver.out")
  # Every record sampled (not the default's 100 traces a second), and a queue large enough
  # that the spans of a 3 000 records/s run are not dropped on the way: the check reads every
  # retried record's trace.
  export OTEL_EXPORTER_OTLP_ENDPOINT OTEL_BSP_SCHEDULE_DELAY=500 OTEL_BSP_MAX_QUEUE_SIZE=65536 \
    OTEL_TRACES_SAMPLER=parentbased_always_on
}

traces_check() { # after the drain: the last spans arrive within a few seconds (batched, then written)
  local writers attempt
  writers=$(services writer | cut -d' ' -f1 | tr '\n' ' ')
  for attempt in 1 2 3; do
    sleep 3
    # shellcheck disable=SC2086 # one argument per writer
    python3 tests/traces/retried.py "$RUN_DIR/spans.jsonl" "$AMQP_PREFIX.records" $writers \
      >"$RUN_DIR/traces.txt" 2>&1 && { cat "$RUN_DIR/traces.txt" >&2; return 0; }
  done
  cat "$RUN_DIR/traces.txt" >&2
  FAULT_FAILED=$(grep -m1 'FAILED' "$RUN_DIR/traces.txt" | sed 's/^traces: FAILED: /traces: /')
  FAULT_FAILED=${FAULT_FAILED:-traces: the check failed}
}

run() {
  local scenario=$1 n=$2
  setup "$scenario" "$n"
  log "scenario $scenario: $COUNT records at $RATE/s, source $SOURCE"
  local writer_env=() writer prefix
  if [ "$scenario" = slow-consumer ]; then
    for writer in $(services writer | cut -d' ' -f1); do
      prefix=$(settings_prefix "$writer")
      writer_env+=("${prefix}_PREFETCH=10" "${prefix}_BATCH_MAX=10" "${prefix}_LINGER=100ms")
    done
  fi
  start filter; start_writers "${writer_env[@]}"
  if ! wait_ready filter "$FILTER_HTTP_ADDR"; then
    printf '%s\t%s\t-\t-\t-\t-\t-\t-\t-\t-\tFAILED (filter never ready)\n' "$scenario" "$COUNT" >>"$RESULTS"
    mesh_teardown; return 0
  fi
  start generator
  if [ "$scenario" = two-sources-kill-mongo-writer ]; then
    SOURCES+=("$SOURCE-b")
    start generator2 GENERATOR_SOURCE="$SOURCE-b" GENERATOR_SPOOL_DIR="$RUN_DIR/spool-b" \
      GENERATOR_HTTP_ADDR="127.0.0.1:$NEXT_PORT"
  fi
  sleep 3
  SKIPPED="" FAULT_FAILED=""
  fault "$scenario"
  local healed; healed=$(now)
  # Each generator exits 0 once every one of the COUNT records is acked.
  local gen_status=0
  wait_generator generator; gen_status=$GEN_STATUS
  if [ -n "${PID[generator2]:-}" ]; then
    wait_generator generator2; [ "$GEN_STATUS" = 0 ] || gen_status=$GEN_STATUS
  fi
  wait_reconciled
  local report=$REPORT ok=$OK
  running receiver && traces_check
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
  mesh_teardown
}

trap 'heal_all; mesh_teardown 2>/dev/null || true; chattr -R -i "$WORK" 2>/dev/null || true' EXIT
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
