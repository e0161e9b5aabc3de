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
# ["ceilings latency hops drains writers mesh filters sustained"], e.g. "mesh" alone (the drains
# drain what the hops queued, so "drains" runs the hops too; "writers" drains BENCH_COUNT records
# with 1, 2 and 3 pg-writers on one queue; "filters" runs the whole mesh with four generators
# into one filter, then into two).
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
PARTS=" ${BENCH_PARTS:-ceilings latency hops drains writers mesh filters sustained} "
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
TIMEFORMAT='%U %S'
GEN_CPU=$( { time generate "$MESH_COUNT" max 0-100 "mesh-${label%% *}" >/dev/null; } 2>&1 )
GEN_DONE=$(now)
for _ in $(seq 6000); do
  target=$(( $(broker_acked) - B0 ))
  [ $(( $(stored "$PG_WRITER_HTTP_ADDR") - PG0 )) -ge "$target" ] && [ $(( $(stored "$MONGO_WRITER_HTTP_ADDR") - M0 )) -ge "$target" ] && break
  sleep 0.05
done
T1=$(now)
HZ=$(getconf CLK_TCK)
CPU="generator $(awk 'END { printf "%.1f", $1 + $2 }' <<<"$GEN_CPU")"
for name in filter pg-writer mongo-writer; do CPU+=", $name $(calc "round(($(ticks "${PID[$name]}") - ${CPU0[$name]}) / $HZ, 1)")"; done
CPU+=", RabbitMQ $(calc "round(($(ticks_tree "$RABBITMQ_PID") - ${CPU0[rabbitmq]}) / $HZ, 1)")"
CPU+=", PostgreSQL $(calc "round(($(ticks_tree "$POSTGRES_PID") - ${CPU0[postgresql]}) / $HZ, 1)")"
CPU+=" of $(calc "round($(nproc) * ($T1 - $T0), 1)") available ($(nproc) cores)"
row "whole mesh, $label, generated until all stored" "$(calc "round($MESH_COUNT / ($T1 - $T0))")" "" "" \
  "generator done after $(calc "round($GEN_DONE - $T0, 1)") s, everything stored after $(calc "round($T1 - $T0, 1)") s; mongo-writer in memory"
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
