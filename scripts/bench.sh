#!/usr/bin/env bash
# Speed, measured: each hop of the mesh beside the raw ceiling of the same hop, measured by the
# bench itself in the same run (the `bench` binary: a minimal WebSocket echo, publisher,
# consumer, inserter and insert_many with the same libraries, topology and record bodies).
# Then the whole mesh, latency and memory at 5 records/s, and a sustained run at fixed rates.
# Prints one table; nothing here is asserted: read the ratios (docs/benchmarks.md).
#
#   scripts/bench.sh
#
# Environment (defaults in brackets): BENCH_COUNT records per hop [50000]; BENCH_FILE_COUNT for
# the WebSocket → file hop and its ceiling, which are too fast for fewer [500000]; BENCH_MONGO_COUNT
# records for the hops that touch the MongoDB server [20000]; BENCH_MESH_COUNT [300000], run once
# with one record a message and once packed, BENCH_PACK records a message at most [100];
# BENCH_LATENCY_SECONDS at 5 records/s [60] (300 records, whose p99 is the third-worst, not the
# second-worst of 150); BENCH_SUSTAIN_RATES ["10000 20000 40000"],
# BENCH_SUSTAIN_SECONDS per rate [60] (empty rates skip the sustained run), BENCH_SUSTAIN_PACK the
# filter's FILTER_PUBLISH_PACK during it [1]; BENCH_PARTS, the parts to run, in this order
# ["ceilings latency hops drains writers mesh filters traces sustained"], e.g. "mesh" alone (the drains
# drain what the hops queued, so "drains" runs the hops too; "writers" drains BENCH_COUNT records
# with 1, 2 and 3 pg-writers on one queue; "filters" runs the whole mesh with four generators
# into one filter, then into two). BENCH_PERF=DIR samples every whole-mesh run with perf into DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh

COUNT=${BENCH_COUNT:-50000}
FILE_COUNT=${BENCH_FILE_COUNT:-500000}
MONGO_COUNT=${BENCH_MONGO_COUNT:-20000}
MESH_COUNT=${BENCH_MESH_COUNT:-300000}
PACK=${BENCH_PACK:-100}
LATENCY_SECONDS=${BENCH_LATENCY_SECONDS:-60}
SUSTAIN_RATES=${BENCH_SUSTAIN_RATES-10000 20000 40000}
SUSTAIN_SECONDS=${BENCH_SUSTAIN_SECONDS:-60}
SUSTAIN_PACK=${BENCH_SUSTAIN_PACK:-1}
PARTS=" ${BENCH_PARTS:-ceilings latency hops drains writers mesh filters traces sustained} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
want drains && PARTS+="hops "

export MONGODB_URL=${MONGODB_URL:-mongodb://127.0.0.1:27017}
source scripts/lib.sh
mesh_setup bench
RESULTS="$WORK/results.tsv"
: >"$RESULTS"
MONGO_DB="flowmesh_bench_$RANDOM"
temp_database bench
export AMQP_PREFIX="flowmesh-bench-$RANDOM" RAW_PREFIX="flowmesh-bench-raw-$RANDOM"
mesh_ports 22080

now() { date +%s.%N; }
# Arithmetic on numbers the script measured: the expression is parsed, never run as code, and
# may hold only numbers, + - * / ( ), comparisons, and/or/if-else, round, max and min.
calc() {
  python3 - "$1" <<'PY'
import ast, operator, sys
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
       ast.Div: operator.truediv, ast.USub: operator.neg, ast.Lt: operator.lt,
       ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}
CALLS = {"round": round, "max": max, "min": min}
def value(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in OPS:
        return OPS[type(node.op)](value(node.left), value(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in OPS:
        return OPS[type(node.op)](value(node.operand))
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in OPS:
        return OPS[type(node.ops[0])](value(node.left), value(node.comparators[0]))
    if isinstance(node, ast.BoolOp):
        values = [value(v) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.IfExp):
        return value(node.body) if value(node.test) else value(node.orelse)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in CALLS:
        return CALLS[node.func.id](*[value(a) for a in node.args])
    raise SystemExit(f"calc: not plain arithmetic: {ast.dump(node)}")
print(value(ast.parse(sys.argv[1], mode="eval").body))
PY
}
row() { printf '%s\n' "$(IFS=$'\t'; echo "$*")" >>"$RESULTS"; } # hop, rate, ceiling name, ceiling, note

ensure() { # SERVICE ADDR [env assignments…]: starts SERVICE unless it runs, and waits until ready
  local name=$1 addr=$2; shift 2
  running "$name" || start "$name" "$@"
  wait_ready "$name" "$addr"
}
metric() { # ADDR NAME LABEL → the sum of NAME's series that carry LABEL (0 when none)
  curl -fsS "http://$1/metrics" 2>/dev/null \
    | awk -v n="$2" -v l="$3" 'index($0, n "{") == 1 && index($0, l) { v += $NF } END { printf "%d\n", v }'
}
stored() { metric "$1" flowmesh_writer_records_total 'outcome="stored"'; }
broker_acked() { metric "$FILTER_HTTP_ADDR" flowmesh_filter_records_acked_total 'destination="broker"'; }
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; } # user + system CPU of PID
# CPU ticks of PID and of its children (PostgreSQL's backends), by PID: never another
# program's processes that happen to share a name.
ticks_tree() {
  local sum=0 t pid
  for pid in "$1" $(pgrep -P "$1" 2>/dev/null); do t=$(ticks "$pid"); sum=$((sum + ${t:-0})); done
  echo "$sum"
}
listener_pid() { ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2; }
RABBITMQ_PID=$(listener_pid 5672)
POSTGRES_PID=$(listener_pid 5432)
raw() { "$BIN/bench" "$@" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["rate"]))'; }

cleanup() {
  mesh_teardown
  local mongo=(); mongo_up && mongo=(--mongodb-database "$MONGO_DB")
  "$BIN/bench" cleanup --prefix "$AMQP_PREFIX" "${mongo[@]}" >/dev/null 2>&1 || true
  "$BIN/bench" cleanup --prefix "$RAW_PREFIX" >/dev/null 2>&1 || true
  "$BIN/bench" cleanup --prefix "$RAW_PREFIX-latency" >/dev/null 2>&1 || true
}
trap cleanup EXIT
# A stop (Ctrl-C, kill) runs the exit trap too.
trap 'exit 130' INT; trap 'exit 143' TERM

# Runs a generator to completion: COUNT RATE VALUES SOURCE; prints the seconds it took.
generate() {
  local t0 t1
  t0=$(now)
  GENERATOR_COUNT=$1 GENERATOR_RATE=$2 GENERATOR_VALUES=$3 GENERATOR_SOURCE=$4 \
    GENERATOR_SPOOL_DIR="$WORK/spool-$4" "$BIN/generator" >>"$WORK/generator.log" 2>&1
  t1=$(now)
  calc "$t1 - $t0"
}

# Waits until the writer at ADDR has stored TARGET records; prints its rate from the first
# stored record seen to the last (polled every 50 ms, so its start-up is not counted).
drain_rate() {
  local addr=$1 target=$2 first="" t0="" n
  for _ in $(seq 12000); do
    n=$(stored "$addr")
    if [ -z "$t0" ] && [ "$n" -gt 0 ]; then t0=$(now); first=$n; fi
    [ "$n" -ge "$target" ] && break
    sleep 0.05
  done
  [ "$n" -ge "$target" ] || { log "writer at $addr stored $n of $target"; echo 0; return; }
  # Everything already stored at the first poll: too quick to time at this BENCH_COUNT.
  [ "$n" -gt "$first" ] || { echo "too quick to time"; return; }
  calc "round(($n - $first) / max($(now) - $t0, 1e-3))"
}

# The pg-writer's drain rate from PostgreSQL's own clock, read after the drain: `received_at` is
# each batch's transaction time, and a batch starts after the one before committed, so from the
# first batch's time to the last's the writer stored every batch but the last. Those rows over
# that time is the rate of the drain, with neither polling's cost nor its granularity.
# Waits (polling every 200 ms, 10 minutes at most) until TARGET records of sources SOURCES (a
# SQL list) are stored, by any number of pg-writers. With several writers, the last batches of
# all but one fall inside the window: the rate is over-stated by at most a batch per extra
# writer (1000 records of BENCH_COUNT).
pg_drain_rate() {
  local target=$1 sources=$2 n=0
  for _ in $(seq 3000); do
    n=$(psql "$DATABASE_URL" -Atc "select count(*) from records where source in ($sources)" 2>/dev/null || echo 0)
    [ "$n" -ge "$target" ] && break
    sleep 0.2
  done
  [ "$n" -ge "$target" ] || { log "pg-writers stored $n of $target"; echo 0; return; }
  psql "$DATABASE_URL" -Atc "with r as (select received_at from records where source in ($sources))
    select round((count(*) filter (where received_at < (select max(received_at) from r)))
      / greatest(extract(epoch from max(received_at) - min(received_at)), 1e-3)) from r"
}

mongo_up() { (exec 3<>/dev/tcp/127.0.0.1/27017) 2>/dev/null; }

# ---- raw ceilings -------------------------------------------------------------------------
RAW_WS="" RAW_PUBLISH="" RAW_CONSUME="" RAW_INSERT="" RAW_MONGO=""
if want ceilings; then
  log "raw ceilings ($COUNT records)"
  RAW_WS=$(raw ws --count "$FILE_COUNT")
  RAW_PUBLISH=$(raw publish --count "$COUNT" --prefix "$RAW_PREFIX")
  RAW_CONSUME=$(raw consume --count "$COUNT" --prefix "$RAW_PREFIX")
  RAW_INSERT=$(raw insert --count "$COUNT")
  mongo_up && RAW_MONGO=$(raw mongo --count "$MONGO_COUNT")
fi

# ---- latency and memory at 5 records/s, fresh services ------------------------------------
ensure filter "$FILTER_HTTP_ADDR"
if want latency; then
log "latency and memory: ${LATENCY_SECONDS} s at 5 records/s, raw and through the mesh"
# The raw floor of the same path: one WebSocket hop, one confirmed publish, one consume and one
# insert a record, at the same rate and for as long, just before the mesh's own run.
RAW_LATENCY=$("$BIN/bench" latency --count $((LATENCY_SECONDS * 5)) --rate 5 --prefix "$RAW_PREFIX-latency" \
  | python3 -c 'import json,sys; d=json.load(sys.stdin); print(" / ".join(f"{d[k]:.1f}" for k in ("p50_ms", "p99_ms", "max_ms")))')
start pg-writer; start mongo-writer MONGO_WRITER_STORE=memory
wait_ready pg-writer "$PG_WRITER_HTTP_ADDR"
GENERATOR_COUNT=$((LATENCY_SECONDS * 5)) GENERATOR_RATE=5 GENERATOR_VALUES=91-100 GENERATOR_SOURCE=latency \
  GENERATOR_SPOOL_DIR="$WORK/spool-latency" "$BIN/generator" >>"$WORK/generator.log" 2>&1 &
PID[generator]=$!
sleep $((LATENCY_SECONDS - 2))
RSS="generator $(rss_mib "${PID[generator]}") MiB, filter $(rss_mib "${PID[filter]}") MiB, pg-writer $(rss_mib "${PID[pg-writer]}") MiB, mongo-writer $(rss_mib "${PID[mongo-writer]}") MiB"
wait "${PID[generator]}"; PID[generator]=""
sleep 1
LATENCY=$(psql "$DATABASE_URL" -Atc "select concat_ws(' / ',
    round((percentile_cont(0.5) within group (order by extract(epoch from received_at - ts)) * 1000)::numeric, 1),
    round((percentile_cont(0.99) within group (order by extract(epoch from received_at - ts)) * 1000)::numeric, 1),
    round((max(extract(epoch from received_at - ts)) * 1000)::numeric, 1))
  from records where source = 'latency'")
row "generator → PostgreSQL latency at 5/s, p50 / p99 / max ms" "$LATENCY" \
  "WS hop + confirmed publish + consume + insert, same rate" "$RAW_LATENCY" "records made with values 91-100, so all go to PostgreSQL"
row "RSS at 5/s" "$RSS" "" "" ""
stop pg-writer; stop mongo-writer
fi
LATENCY_ACKED=$(broker_acked) # already stored: the writers started next begin from zero

# ---- the filter, one destination at a time (writers stopped: their queues fill) -------------
if want hops; then
log "filter hops ($COUNT records each)"
SECONDS_BROKER=$(generate "$COUNT" max 91-100 broker-only)
row "generator → filter → RabbitMQ (91-100)" "$(calc "round($COUNT / $SECONDS_BROKER)")" \
  "confirmed publish, fanout → 2 quorum queues" "$RAW_PUBLISH" ""
SECONDS_FILE=$(generate "$FILE_COUNT" max 0-90 file-only)
row "generator → filter → file (0-90)" "$(calc "round($FILE_COUNT / $SECONDS_FILE)")" \
  "WebSocket loopback, JSON parse + ack" "$RAW_WS" "fsync per group commit"
SECONDS_MIXED=$(generate "$COUNT" max 0-100 mixed)
row "generator → filter, mixed (0-100)" "$(calc "round($COUNT / $SECONDS_MIXED)")" "" "" ""
fi

# ---- the writers draining what the filter left in their queues -----------------------------
if want drains; then
QUEUED=$(( $(broker_acked) - LATENCY_ACKED ))
log "writers draining $QUEUED records"
start pg-writer
row "pg-writer draining its queue" "$(pg_drain_rate "$QUEUED" "'broker-only', 'mixed'")" \
  "consume (prefetch 2000) / insert unnest (batch 1000)" "$RAW_CONSUME / $RAW_INSERT" "rate from PostgreSQL's received_at"
start mongo-writer MONGO_WRITER_STORE=memory
row "mongo-writer draining its queue, in-memory store" "$(drain_rate "$MONGO_WRITER_HTTP_ADDR" "$QUEUED")" \
  "consume (prefetch 2000)" "$RAW_CONSUME" ""
stop mongo-writer
if mongo_up; then
  BEFORE=$(broker_acked)
  generate "$MONGO_COUNT" max 91-100 mongo-drain >/dev/null
  QUEUED=$(( $(broker_acked) - BEFORE ))
  start mongo-writer MONGO_WRITER_STORE=mongodb MONGODB_DATABASE="$MONGO_DB"
  row "mongo-writer draining its queue into the MongoDB server" "$(drain_rate "$MONGO_WRITER_HTTP_ADDR" "$QUEUED")" \
    "insert_many of the same documents (j: true)" "$RAW_MONGO" "server: whatever answers on 27017"
  stop mongo-writer
fi
fi

# ---- competing pg-writers: the same backlog drained by 1, 2 and 3 on one queue -------------
if want writers; then
log "pg-writers on one queue: $COUNT records drained by 1, 2 and 3"
stop pg-writer; stop mongo-writer
# What earlier parts left queued would be drained with (and slow) the first run.
for queue in pg-writer mongo-writer; do rabbitmqctl -q purge_queue "$AMQP_PREFIX.records.$queue" >/dev/null 2>&1 || true; done
# mongo-writer (in memory) keeps its own queue empty meanwhile.
start mongo-writer MONGO_WRITER_STORE=memory
for k in 1 2 3; do
  generate "$COUNT" max 91-100 "pg-writers-$k" >/dev/null
  names=()
  for i in $(seq "$k"); do
    names+=("pg-writer$i")
    start "pg-writer$i" PG_WRITER_HTTP_ADDR="127.0.0.1:$((NEXT_PORT + i))"
  done
  rate=$(pg_drain_rate "$COUNT" "'pg-writers-$k'")
  conflicts=0
  for i in $(seq "$k"); do
    conflicts=$((conflicts + $(metric "127.0.0.1:$((NEXT_PORT + i))" flowmesh_writer_store_conflicts_total 'writer="pg-writer"')))
  done
  for name in "${names[@]}"; do stop "$name"; done
  row "pg-writers draining one queue: $k" "$rate" \
    "consume (prefetch 2000) / insert unnest (batch 1000)" "$RAW_CONSUME / $RAW_INSERT" \
    "rate from PostgreSQL's received_at; $conflicts conflicts retried"
done
drain_rate "$MONGO_WRITER_HTTP_ADDR" $((3 * COUNT)) >/dev/null
stop mongo-writer
fi

# ---- the whole mesh --------------------------------------------------------------------------
if want mesh || want sustained; then
  ensure pg-writer "$PG_WRITER_HTTP_ADDR"
  ensure mongo-writer "$MONGO_WRITER_HTTP_ADDR" MONGO_WRITER_STORE=memory
fi
mesh_run() { # LABEL: the whole mesh with the filter as it runs now, until everything is stored
local label=$1
log "whole mesh ($label): $MESH_COUNT records"
PG0=$(stored "$PG_WRITER_HTTP_ADDR"); B0=$(broker_acked); M0=$(stored "$MONGO_WRITER_HTTP_ADDR")
# CPU seconds each process spends on the run, beside what the machine's cores offered.
declare -A CPU0
for name in filter pg-writer mongo-writer; do CPU0[$name]=$(ticks "${PID[$name]}"); done
CPU0[rabbitmq]=$(ticks_tree "$RABBITMQ_PID"); CPU0[postgresql]=$(ticks_tree "$POSTGRES_PID")
T0=$(now)
# BENCH_PERF=DIR: each whole-mesh run is sampled system-wide by perf (cpu-clock, call graphs unwound by DWARF)
# into DIR/<label>.data, to read with `perf report -i FILE --sort comm,dso,sym`.
local perf_pid=""
if [ -n "${BENCH_PERF:-}" ]; then
  mkdir -p "$BENCH_PERF"
  perf record -a --call-graph dwarf,16384 -e cpu-clock -F 299 -o "$BENCH_PERF/${label//[^a-zA-Z0-9]/-}.data" >/dev/null 2>&1 &
  perf_pid=$!
fi
TIMEFORMAT='%U %S'
# A source of its own per label: a source's spool carries its count over to the next run.
local source="mesh-${label//[^a-zA-Z0-9]/-}"
# When the filter acked the run's last record, apart from the generator's exit (which may wait
# on the generator's own shutdown, e.g. its last spans' flush).
local acked0 acked_at="$WORK/acked-at"
acked0=$(metric "$FILTER_HTTP_ADDR" flowmesh_filter_records_acked_total 'destination=')
rm -f "$acked_at"
( for _ in $(seq 12000); do
    [ "$(metric "$FILTER_HTTP_ADDR" flowmesh_filter_records_acked_total 'destination=')" -ge $((acked0 + MESH_COUNT)) ] \
      && { now >"$acked_at"; break; }
    sleep 0.05
  done ) &
local acked_poll=$!
GEN_CPU=$( { time generate "$MESH_COUNT" "${MESH_GEN_RATE:-max}" 0-100 "${source:0:60}" >/dev/null; } 2>&1 )
wait "$acked_poll" 2>/dev/null || true
ACKED_AFTER=$( [ -s "$acked_at" ] && calc "round($(cat "$acked_at") - $T0, 1)" || echo "?")
GEN_DONE=$(now)
for _ in $(seq 6000); do
  target=$(( $(broker_acked) - B0 ))
  [ $(( $(stored "$PG_WRITER_HTTP_ADDR") - PG0 )) -ge "$target" ] && [ $(( $(stored "$MONGO_WRITER_HTTP_ADDR") - M0 )) -ge "$target" ] && break
  sleep 0.05
done
T1=$(now)
if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true; fi
HZ=$(getconf CLK_TCK)
CPU="generator $(awk 'END { printf "%.1f", $1 + $2 }' <<<"$GEN_CPU")"
# The mesh's own CPU seconds (generator, filter, writers), for the traces part's comparison.
MESH_CPU=$(awk 'END { printf "%.2f", $1 + $2 }' <<<"$GEN_CPU")
for name in filter pg-writer mongo-writer; do MESH_CPU=$(calc "$MESH_CPU + ($(ticks "${PID[$name]}") - ${CPU0[$name]}) / $HZ"); done
for name in filter pg-writer mongo-writer; do CPU+=", $name $(calc "round(($(ticks "${PID[$name]}") - ${CPU0[$name]}) / $HZ, 1)")"; done
CPU+=", RabbitMQ $(calc "round(($(ticks_tree "$RABBITMQ_PID") - ${CPU0[rabbitmq]}) / $HZ, 1)")"
CPU+=", PostgreSQL $(calc "round(($(ticks_tree "$POSTGRES_PID") - ${CPU0[postgresql]}) / $HZ, 1)")"
CPU+=" of $(calc "round($(nproc) * ($T1 - $T0), 1)") available ($(nproc) cores)"
MESH_RATE=$(calc "round($MESH_COUNT / ($T1 - $T0))")
row "whole mesh, $label, generated until all stored" "$MESH_RATE" "" "" \
  "last record acked after $ACKED_AFTER s, generator done after $(calc "round($GEN_DONE - $T0, 1)") s, everything stored after $(calc "round($T1 - $T0, 1)") s; mongo-writer in memory"
row "CPU seconds spent on that run" "" "" "" "$CPU"
}
if want mesh; then
mesh_run "one record a message"
# The same run with the filter packing broker-bound records (FILTER_PUBLISH_PACK).
stop filter; ensure filter "$FILTER_HTTP_ADDR" FILTER_PUBLISH_PACK="$PACK"
mesh_run "packed (FILTER_PUBLISH_PACK=$PACK)"
stop filter; ensure filter "$FILTER_HTTP_ADDR"
fi

# ---- the whole mesh with one filter, then two ------------------------------------------------
# Four generators (BENCH_MESH_COUNT records in all) at full speed; with two filters, two of the
# sources have each filter as their home (rendezvous hashing, contracts §2, computed here with
# md5sum to pick the sources).
home_of() { # SOURCE URL… → the URL ranked first for SOURCE
  local source=$1 url; shift
  for url in "$@"; do
    printf '%s %s\n' "$(printf '%s\n%s' "$source" "$url" | md5sum | cut -c1-16)" "$url"
  done | sort -r | head -1 | cut -d' ' -f2
}
acked_all() { # the broker-bound records acked by every filter running
  local sum=0 addr
  for addr in "$@"; do sum=$((sum + $(metric "$addr" flowmesh_filter_records_acked_total 'destination="broker"'))); done
  echo "$sum"
}
filters_run() { # SUFFIX URLS FILTER_HTTP_ADDRS…: four generators (sources SOURCES + SUFFIX) until all is stored
  local suffix=$1 urls=$2; shift 2
  local each=$((MESH_COUNT / 4)) t0 t1 b0 pg0 m0 target i
  b0=$(acked_all "$@"); pg0=$(stored "$PG_WRITER_HTTP_ADDR"); m0=$(stored "$MONGO_WRITER_HTTP_ADDR")
  t0=$(now)
  for i in 0 1 2 3; do
    FILTER_URL=$urls GENERATOR_COUNT=$each GENERATOR_RATE=max GENERATOR_VALUES=0-100 \
      GENERATOR_SOURCE="${SOURCES[$i]}$suffix" GENERATOR_HTTP_ADDR="127.0.0.1:$((NEXT_PORT + 20 + i))" \
      GENERATOR_SPOOL_DIR="$WORK/spool-${SOURCES[$i]}$suffix" "$BIN/generator" >>"$WORK/generator.log" 2>&1 &
    PID[gen$i]=$!
  done
  for i in 0 1 2 3; do wait "${PID[gen$i]}"; PID[gen$i]=""; done
  for _ in $(seq 6000); do
    target=$(( $(acked_all "$@") - b0 ))
    [ $(( $(stored "$PG_WRITER_HTTP_ADDR") - pg0 )) -ge "$target" ] && [ $(( $(stored "$MONGO_WRITER_HTTP_ADDR") - m0 )) -ge "$target" ] && break
    sleep 0.05
  done
  t1=$(now)
  echo "$(calc "round($MESH_COUNT / ($t1 - $t0))") $(calc "round($t1 - $t0, 1)")"
}
if want filters; then
  ensure pg-writer "$PG_WRITER_HTTP_ADDR"
  ensure mongo-writer "$MONGO_WRITER_HTTP_ADDR" MONGO_WRITER_STORE=memory
  FILTER2_LISTEN="127.0.0.1:$((NEXT_PORT + 10))" FILTER2_HTTP="127.0.0.1:$((NEXT_PORT + 11))"
  URL1=$FILTER_URL URL2="ws://$FILTER2_LISTEN/ingest"
  SOURCES=()
  for n in $(seq 1 200); do # the first two sources at home on each filter (for the run into two)
    home=$(home_of "bench-$n" "$URL1" "$URL2")
    mine=0; for s in "${SOURCES[@]}"; do [ "$(home_of "$s" "$URL1" "$URL2")" = "$home" ] && mine=$((mine + 1)); done
    [ "$mine" -lt 2 ] && SOURCES+=("bench-$n")
    [ ${#SOURCES[@]} -eq 4 ] && break
  done
  log "whole mesh, four generators ($MESH_COUNT records): one filter"
  read -r ONE_RATE ONE_TOOK < <(filters_run -one "$URL1" "$FILTER_HTTP_ADDR")
  start filter2 FILTER_LISTEN="$FILTER2_LISTEN" FILTER_HTTP_ADDR="$FILTER2_HTTP" FILTER_DATA_DIR="$RUN_DIR/filter2"
  wait_ready filter2 "$FILTER2_HTTP"
  log "whole mesh, four generators ($MESH_COUNT records): two filters"
  read -r TWO_RATE TWO_TOOK < <(filters_run "" "$URL1,$URL2" "$FILTER_HTTP_ADDR" "$FILTER2_HTTP")
  stop filter2
  row "whole mesh, 4 generators, one filter" "$ONE_RATE" "" "" "everything stored after $ONE_TOOK s; mongo-writer in memory"
  row "whole mesh, 4 generators, two filters" "$TWO_RATE" "the same run into one filter" "$ONE_RATE" \
    "two sources at home on each; everything stored after $TWO_TOOK s"
fi

# ---- traces: the whole mesh with every service exporting spans, and to a dead collector -----
# After a warm-up run (not counted: the first run after the services start is the slowest),
# BENCH_TRACES_ROUNDS rounds [3] of BENCH_TRACES_COUNT records [200000] a run: export off; on at
# the default settings (batching, and the default sampler: 100 traces a second started on the
# generator, every later hop following its decision) to a receiver that decodes every request;
# the same with every record sampled (OTEL_TRACES_SAMPLER=parentbased_always_on); with
# BENCH_TRACES_RATIO [0.01] of them sampled (parentbased_traceidratio; empty: not run); then
# the default and every record to a receiver that answers BENCH_TRACES_SLOW_MS [2000] late, and
# to a port nobody listens on; export off again. Each row's ceiling is the mean of its round's
# two runs with export off (which open and close it, so that neither end of a round is
# favoured); the last rows give each setting's median ratio.
traces_run() { # LABEL ENDPOINT (empty: export off) [SAMPLER [ARG]: on the generator]
  local label=$1 endpoint=$2 sampler=${3:-} arg=${4:-} name receiver0
  for name in filter pg-writer mongo-writer; do stop "$name"; done
  ensure filter "$FILTER_HTTP_ADDR" OTEL_EXPORTER_OTLP_ENDPOINT="$endpoint"
  ensure pg-writer "$PG_WRITER_HTTP_ADDR" OTEL_EXPORTER_OTLP_ENDPOINT="$endpoint"
  ensure mongo-writer "$MONGO_WRITER_HTTP_ADDR" MONGO_WRITER_STORE=memory OTEL_EXPORTER_OTLP_ENDPOINT="$endpoint"
  receiver0=$(ticks "$RECEIVER_PID")
  # The sampler matters on the generator only: every later hop follows its decision (empty:
  # the default).
  OTEL_TRACES_SAMPLER=$sampler OTEL_TRACES_SAMPLER_ARG=$arg MESH_COUNT=$TRACES_COUNT \
    OTEL_EXPORTER_OTLP_ENDPOINT=$endpoint mesh_run "$label"
  local exported=0 full=0 failed=0 addr
  for addr in "$FILTER_HTTP_ADDR" "$PG_WRITER_HTTP_ADDR" "$MONGO_WRITER_HTTP_ADDR"; do
    exported=$((exported + $(curl -fsS "http://$addr/metrics" | awk '/^flowmesh_trace_spans_exported_total/ { v += $NF } END { printf "%d", v }')))
    full=$((full + $(metric "$addr" flowmesh_trace_spans_dropped_total 'reason="queue_full"')))
    failed=$((failed + $(metric "$addr" flowmesh_trace_spans_dropped_total 'reason="export_failed"')))
  done
  TRACES_NOTE="filter, writers: $exported spans exported, $full dropped (queue full), $failed dropped (export failed); filter RSS $(( $(ps -o rss= -p "${PID[filter]}") / 1024 )) MiB; the receiver's CPU $(calc "round(($(ticks "$RECEIVER_PID") - $receiver0) / $(getconf CLK_TCK), 2)") s"
}
declare -A TRACES_RATIOS=()
ROUND_ROWS=()
traces_row() { # HOP LABEL ENDPOINT [SAMPLER [ARG]]: one run, kept for its round's rows
  local hop=$1 label=$2 endpoint=$3 received=""
  traces_run "$label (round $round)" "$endpoint" "${4:-}" "${5:-}"
  [ "$endpoint" = "$RECEIVER" ] && received="; received $(tail -1 "$WORK/receiver.out")"
  ROUND_ROWS+=("$hop"$'\t'"$MESH_RATE"$'\t'"$TRACES_NOTE$received; the mesh's CPU $(calc "round($MESH_CPU, 2)") s")
}
round_rows() { # the round's rows, each beside the mean of the round's two runs with export off
  local off_rate off_cpu line hop rate note
  off_rate=$(calc "round(($OFF_RATE + $MESH_RATE) / 2)")
  off_cpu=$(calc "round(($OFF_CPU + $MESH_CPU) / 2, 2)")
  row "traces off, round $round (first and last run)" "$off_rate" "" "" "$OFF_RATE and $MESH_RATE records/s; the mesh's CPU $(calc "round($OFF_CPU, 2)") s and $(calc "round($MESH_CPU, 2)") s"
  for line in "${ROUND_ROWS[@]}"; do
    IFS=$'\t' read -r hop rate note <<<"$line"
    row "$hop" "$rate" "round $round, traces off" "$off_rate" "$note, off $off_cpu s"
    TRACES_RATIOS[$hop]+=" $(calc "round($rate / $off_rate, 3)")"
  done
  ROUND_ROWS=()
}
if want traces; then
  TRACES_COUNT=${BENCH_TRACES_COUNT:-200000} TRACES_RATIO=${BENCH_TRACES_RATIO-0.01}
  # BENCH_TRACES_RATE: generate at that many records/s instead of flat out; the throughput is
  # then the rate, and the mesh's CPU seconds beside each row tell the cost.
  export MESH_GEN_RATE=${BENCH_TRACES_RATE:-max}
  ensure pg-writer "$PG_WRITER_HTTP_ADDR"
  "$BIN/bench" receiver >"$WORK/receiver.out" 2>&1 &
  RECEIVER_PID=$!
  for _ in $(seq 100); do [ -s "$WORK/receiver.out" ] && break; sleep 0.1; done
  RECEIVER=$(head -1 "$WORK/receiver.out")
  SLOW_MS=${BENCH_TRACES_SLOW_MS:-2000}
  "$BIN/bench" receiver --delay-ms "$SLOW_MS" >"$WORK/slow-receiver.out" 2>&1 &
  SLOW_PID=$!
  for _ in $(seq 100); do [ -s "$WORK/slow-receiver.out" ] && break; sleep 0.1; done
  SLOW=$(head -1 "$WORK/slow-receiver.out")
  DEAD="http://127.0.0.1:$((NEXT_PORT + 30))"
  traces_run "traces off, warm-up (not counted)" ""
  for round in $(seq "${BENCH_TRACES_ROUNDS:-3}"); do
    traces_run "traces off (round $round)" ""
    OFF_RATE=$MESH_RATE OFF_CPU=$MESH_CPU
    traces_row "traces exported, default settings" "traces exported, default" "$RECEIVER"
    traces_row "traces exported, every record sampled" "traces exported, all sampled" "$RECEIVER" parentbased_always_on
    if [ -n "$TRACES_RATIO" ]; then
      traces_row "traces exported, $TRACES_RATIO of the records sampled" "traces exported, $TRACES_RATIO sampled" \
        "$RECEIVER" parentbased_traceidratio "$TRACES_RATIO"
    fi
    traces_row "traces to a slow collector, default settings" "traces to a slow collector, default" "$SLOW"
    traces_row "traces to a slow collector, every record sampled" "traces to a slow collector, all sampled" "$SLOW" parentbased_always_on
    traces_row "traces to a dead collector, default settings" "traces to a dead collector, default" "$DEAD"
    traces_row "traces to a dead collector, every record sampled" "traces to a dead collector, all sampled" "$DEAD" parentbased_always_on
    traces_run "traces off, end of round $round" ""
    round_rows
  done
  kill "$RECEIVER_PID" "$SLOW_PID" 2>/dev/null; wait "$RECEIVER_PID" "$SLOW_PID" 2>/dev/null || true
  for hop in "traces exported, default settings" "traces exported, every record sampled" \
    ${TRACES_RATIO:+"traces exported, $TRACES_RATIO of the records sampled"} \
    "traces to a slow collector, default settings" "traces to a slow collector, every record sampled" \
    "traces to a dead collector, default settings" "traces to a dead collector, every record sampled"; do
    row "$hop: median of the rounds" "" "" "" \
      "ratio $(tr ' ' '\n' <<<"${TRACES_RATIOS[$hop]}" | sed '/^$/d' | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }') (each round:${TRACES_RATIOS[$hop]})"
  done
  # The services as the later parts expect them: export off.
  for name in filter pg-writer mongo-writer; do stop "$name"; done
  ensure filter "$FILTER_HTTP_ADDR"; ensure pg-writer "$PG_WRITER_HTTP_ADDR"
  ensure mongo-writer "$MONGO_WRITER_HTTP_ADDR" MONGO_WRITER_STORE=memory
  unset MESH_GEN_RATE
fi

# ---- sustained -------------------------------------------------------------------------------
BEST="-"
want sustained || SUSTAIN_RATES=""
if [ -n "$SUSTAIN_RATES" ] && [ "$SUSTAIN_PACK" != 1 ]; then
  stop filter; ensure filter "$FILTER_HTTP_ADDR" FILTER_PUBLISH_PACK="$SUSTAIN_PACK"
fi
for rate in $SUSTAIN_RATES; do
  log "sustained: $rate records/s for $SUSTAIN_SECONDS s"
  source_name="sustain-$rate"
  count=$((rate * SUSTAIN_SECONDS))
  t0=$(now)
  GENERATOR_COUNT=$count GENERATOR_RATE=$rate GENERATOR_SOURCE=$source_name \
    GENERATOR_SPOOL_DIR="$WORK/spool-$source_name" "$BIN/generator" >>"$WORK/generator.log" 2>&1 &
  PID[generator]=$!
  peak=0
  while kill -0 "${PID[generator]}" 2>/dev/null; do
    depth=$(rabbitmqctl -q list_queues name messages 2>/dev/null \
      | awk -v p="$AMQP_PREFIX.records." 'index($1, p) == 1 { s += $2 } END { print s + 0 }')
    [ "$depth" -gt "$peak" ] && peak=$depth
    sleep 2
  done
  wait "${PID[generator]}"; PID[generator]=""
  took=$(calc "round($(now) - $t0, 1)")
  sleep 2
  p99=$(psql "$DATABASE_URL" -Atc "select round((percentile_cont(0.99) within group (order by extract(epoch from received_at - ts)) * 1000)::numeric)
    from records where source = '$source_name'")
  kept=$(calc "1 if $took <= $SUSTAIN_SECONDS * 1.05 + 2 and ${p99:-999999} < 1000 else 0")
  row "sustained $rate/s for $SUSTAIN_SECONDS s$([ "$SUSTAIN_PACK" != 1 ] && echo ", packed $SUSTAIN_PACK")" "$([ "$kept" = 1 ] && echo kept up || echo fell behind)" "" "" \
    "took $took s, p99 to PostgreSQL ${p99:-?} ms, peak queue depth $peak"
  [ "$kept" = 1 ] || break
  BEST=$rate
done
[ -n "$SUSTAIN_RATES" ] && row "highest sustained rate tried that kept up" "$BEST" "" "" "queues bounded, p99 < 1 s"

python3 - "$RESULTS" <<'PY'
import sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
def ratio(a, b):
    try:
        a = float(a); b = min(float(x) for x in b.split(" / "))
        return f"{a / b:.2f}"
    except (ValueError, ZeroDivisionError):
        return ""
print()
print(f"{'hop':<56} {'flowmesh':>14}   {'raw ceiling (same run)':<52} {'ceiling':>16} {'ratio':>6}  note")
for hop, rate, name, ceiling, note in (r + [""] * (5 - len(r)) for r in rows):
    print(f"{hop:<56} {rate:>14}   {name:<52} {ceiling:>16} {ratio(rate, ceiling):>6}  {note}")
print()
print("rates in records (messages, rows, documents) per second; a pg-writer ratio is to the lower ceiling")
PY
echo "logs: $WORK"
