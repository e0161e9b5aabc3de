#!/usr/bin/env bash
# The soak: the whole mesh (real binaries, the real RabbitMQ, PostgreSQL and MongoDB) runs for
# MINUTES with three sources while a fault from the chaos catalogue, drawn at random from a seed,
# hits every minute. Every 10 s it samples each service's RSS and open files, the disk the mesh
# uses (generator spools, the filter's file sink, its dead letters) and the writer queues' depth
# into soak.csv, and at the end draws soak.png (one panel each) and prints a table. It fails when
# a record is lost, duplicated or dead-lettered, or when RSS, open files, a spool or a queue keeps
# growing (the last third of the run above the middle third by more than noise allows).
#
#   scripts/soak.sh 30            # 30 minutes; CSV, chart and logs under SOAK_DIR
#
# Environment: SOAK_RATE (records per second per source, default 100: each spool then fills its
# 4 MiB segment and compacts every few minutes, so the chart shows its bound), SOAK_SEED (default
# 1: the same faults in the same order), SOAK_DIR (default: a fresh directory under /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:?usage: scripts/soak.sh MINUTES}
[[ $MINUTES =~ ^[1-9][0-9]*$ ]] || { echo "MINUTES must be a whole number of minutes" >&2; exit 2; }
source scripts/deps.sh
export MONGODB_URL=${MONGODB_URL-mongodb://127.0.0.1:27017}

RATE=${SOAK_RATE:-100}
SEED=${SOAK_SEED:-1}
SECONDS_TOTAL=$((MINUTES * 60))
# Each generator stops producing about when the last fault is healed; the rest is drained.
COUNT=$((RATE * SECONDS_TOTAL))
export RUST_LOG=${RUST_LOG:-info}
WORK=${SOAK_DIR:-}
source scripts/lib.sh
mesh_setup soak
CSV="$WORK/soak.csv" FAULTS="$WORK/faults.tsv"
source scripts/faults.sh

# The three generators, then every other service of the one list (common/src/services.rs).
mapfile -t OTHERS < <(services | awk '$3 != "generator" { print $1 }')
SERVICES=(generator generator2 generator3 "${OTHERS[@]}")
SOURCES=("soak-a-$RANDOM" "soak-b-$RANDOM" "soak-c-$RANDOM")
# The faults drawn from (the chaos catalogue's, each injected and healed within a minute).
CATALOGUE=(kill-generator kill-filter kill-pg-writer kill-mongo-writer rabbitmq-restart
  postgres-down-30s postgres-frozen-30s file-unwritable-30s mongodb-restart mongodb-failing-30s)

export AMQP_PREFIX="flowmesh-soak"
base=23000
mesh_ports $base
export GENERATOR_COUNT=$COUNT GENERATOR_RATE=$RATE
export GENERATOR_BREAKER_MAX_OPEN_WAIT=5s FILTER_BREAKER_MAX_OPEN_WAIT=5s
export PG_WRITER_BREAKER_MAX_OPEN_WAIT=5s MONGO_WRITER_BREAKER_MAX_OPEN_WAIT=5s
temp_database soak
# The MongoDB database is the writer's default; the soak's groups are told apart by source.

start_generator() { # NAME INDEX: generator N of the three, its own source, spool and probe port
  start "$1" GENERATOR_SOURCE="${SOURCES[$2]}" GENERATOR_SPOOL_DIR="$WORK/spool-$2" \
    GENERATOR_HTTP_ADDR="127.0.0.1:$((NEXT_PORT + $2))"
}
GENERATORS=(generator generator2 generator3)

SAMPLER=""
trap 'heal_all; [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null; mesh_teardown 2>/dev/null || true; chattr -R -i "$WORK" 2>/dev/null || true' EXIT
trap 'exit 130' INT; trap 'exit 143' TERM

# One CSV row every 10 s: per service RSS (KiB) and open files; disk bytes; queue depths.
sample() {
  local header="t" name
  for name in "${SERVICES[@]}"; do header+=",rss_kib_$name,files_$name"; done
  # One depth column a queue: each writer's (from the list), then the dead letters.
  local queue_names=() queue_header=""
  for name in $(services writer | cut -d' ' -f1); do
    queue_names+=("records.$name") queue_header+=",queue_${name//-/_}"
  done
  queue_names+=(dead-letter) queue_header+=",queue_dead_letter"
  echo "$header,spool_bytes,file_sink_bytes,dead_letter_file_bytes$queue_header" >"$CSV"
  local started; started=$(date +%s)
  while :; do
    local row pid rss files
    row=$(( $(date +%s) - started ))
    for name in "${SERVICES[@]}"; do
      pid=$(cat "$RUN_DIR/$name.pid" 2>/dev/null || true)
      rss=$(rss_kib "$pid")
      files=$(open_files "$pid")
      [ -n "$rss" ] || files=""
      row+=",$rss,$files"
    done
    local spool sink dead
    spool=$(du -sb "$WORK"/spool-* 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
    sink=$(find "$FILTER_DATA_DIR" -name 'records*.jsonl*' -printf '%s\n' 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
    dead=$(find "$FILTER_DATA_DIR" -name 'dead-letter*.jsonl*' -printf '%s\n' 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
    local queues
    queues=$(timeout 8 rabbitmqctl -q list_queues name messages 2>/dev/null | awk -v p="$AMQP_PREFIX." \
      -v names="${queue_names[*]}" '
      { depth[$1] = $2 }
      END { n = split(names, q, " "); for (i = 1; i <= n; i++) printf ",%s", depth[p q[i]] }' || true)
    echo "$row,$spool,$sink,$dead$queues" >>"$CSV"
    sleep $(( 10 - ($(date +%s) - started) % 10 ))
  done
}

log "soak: $MINUTES min, 3 sources at $RATE records/s each, a fault a minute (seed $SEED); in $WORK"
start filter; start_writers
wait_ready filter "$FILTER_HTTP_ADDR" || exit 1
for i in 0 1 2; do start_generator "${GENERATORS[$i]}" "$i"; done
sample & SAMPLER=$!

# The faults, one a minute from the second minute on, drawn from the seed.
mapfile -t PLAN < <(python3 - "$SEED" "$MINUTES" "${CATALOGUE[@]}" <<'PY'
import random, sys
rng = random.Random(int(sys.argv[1]))
for _ in range(max(int(sys.argv[2]) - 1, 1)):
    print(rng.choice(sys.argv[3:]))
PY
)
printf 'minute\tfault\ttook_s\tresult\n' >"$FAULTS"
began=$(date +%s)
minute=1
for planned in "${PLAN[@]}"; do
  # Wait for the minute's start.
  while [ $(( $(date +%s) - began )) -lt $((minute * 60)) ]; do sleep 1; done
  SKIPPED="" FAULT_FAILED=""
  at=$(date +%s)
  if [ "$planned" = kill-generator ]; then
    # One of the three generators, chosen by the same seed.
    i=$(( (SEED + minute) % 3 ))
    log "minute $minute: kill -9 ${GENERATORS[$i]}"
    kill9 "${GENERATORS[$i]}"; sleep 1; start_generator "${GENERATORS[$i]}" "$i"
  else
    log "minute $minute: $planned"
    fault "$planned"
  fi
  result=ok
  [ -n "$SKIPPED" ] && result="SKIPPED ($SKIPPED)"
  [ -n "$FAULT_FAILED" ] && result="FAILED ($FAULT_FAILED)"
  printf '%s\t%s\t%s\t%s\n' "$minute" "$planned" "$(( $(date +%s) - at ))" "$result" >>"$FAULTS"
  minute=$((minute + 1))
done
while [ $(( $(date +%s) - began )) -lt "$SECONDS_TOTAL" ]; do sleep 1; done

# Every generator exits 0 once its records are all acked (at most 5 min more for the backlog).
gen_failed=""
for name in "${GENERATORS[@]}"; do
  wait_generator "$name"
  case $GEN_STATUS in 0) ;; 124) gen_failed+=" $name(still running)" ;; *) gen_failed+=" $name(exit $GEN_STATUS)" ;; esac
done
wait_reconciled
sleep 10 # one more sample of the drained mesh
kill "$SAMPLER" 2>/dev/null || true; wait "$SAMPLER" 2>/dev/null || true; SAMPLER=""
read -r ok lost dup file pg mongo <<<"$(summary "$REPORT")"
dead=$(dead_letters); dead=${dead:-0}

# The chart and the growth check, from the CSV.
venv=var/soak-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
  log "installing matplotlib for the chart into $venv"
  python3 -m venv "$venv" && "$venv/bin/pip" install --quiet --disable-pip-version-check matplotlib >&2
fi
growth=$("$venv/bin/python" - "$CSV" "$FAULTS" "$WORK/soak.png" <<'PY'
import csv, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

rows = list(csv.DictReader(open(sys.argv[1])))
faults = list(csv.DictReader(open(sys.argv[2]), delimiter="\t"))
t = [int(r["t"]) / 60 for r in rows]
def series(name, scale=1.0):
    return [float(r[name]) * scale if r.get(name) not in (None, "") else float("nan") for r in rows]
services = [c[len("rss_kib_"):] for c in rows[0] if c.startswith("rss_kib_")] if rows else []
panels = [
    ("RSS (MiB)", [(s, series("rss_kib_" + s, 1 / 1024)) for s in services]),
    ("open files", [(s, series("files_" + s)) for s in services]),
    ("disk (MiB)", [(n, series(c, 1 / 2**20)) for n, c in
                    [("generator spools", "spool_bytes"), ("file sink (the records themselves)", "file_sink_bytes"),
                     ("dead letters (file)", "dead_letter_file_bytes")]]),
    ("queue depth (messages)", [(c[len("queue_"):].replace("_", "-"), series(c))
                                for c in (rows[0] if rows else []) if c.startswith("queue_")]),
]
fig, axes = plt.subplots(len(panels), 1, figsize=(11, 12), sharex=True)
for ax, (title, lines) in zip(axes, panels):
    for name, ys in lines:
        ax.plot(t, ys, label=name, linewidth=1.2)
    for f in faults:
        ax.axvline(int(f["minute"]), color="grey", alpha=0.3, linewidth=0.8)
    ax.set_ylabel(title)
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize=7, ncol=3)
    ax.grid(alpha=0.2)
axes[0].set_title("flowmesh soak: grey lines are faults (" + ", ".join(f["fault"] for f in faults[:6]) + ("…" if len(faults) > 6 else "") + ")", fontsize=9)
axes[-1].set_xlabel("minutes")
fig.tight_layout()
fig.savefig(sys.argv[3], dpi=90)

# Growth: the last third against the middle third, beyond what noise and faults allow.
allow = {"rss_kib_": (1.5, 24 * 1024), "files_": (1.5, 24), "spool_bytes": (1.5, 8 * 2**20),
         "queue_": (1.5, 5000)}
n = len(rows)
grown = []
if n >= 9:
    middle, last = rows[n // 3: 2 * n // 3], rows[2 * n // 3:]
    for column in rows[0]:
        rule = next((v for k, v in allow.items() if column.startswith(k)), None)
        if rule is None:
            continue
        def peak(part):
            values = [float(r[column]) for r in part if r[column] not in ("", None)]
            return max(values) if values else None
        a, b = peak(middle), peak(last)
        if a is not None and b is not None and b > a * rule[0] + rule[1]:
            grown.append(f"{column} {a:.0f} -> {b:.0f}")
print("; ".join(grown))
PY
)

echo
echo "soak: $MINUTES min, seed $SEED, $((COUNT * 3)) records from 3 sources"
column -t -s $'\t' "$FAULTS"
echo
printf '%-10s %7s %10s %8s %5s %10s %13s %s\n' generated file postgresql mongodb lost duplicated dead_lettered growth
printf '%-10s %7s %10s %8s %5s %10s %13s %s\n' "$((COUNT * 3))" "$file" "$pg" "$mongo" "$lost" "$dup" "$dead" "${growth:-none}"
echo "samples: $CSV; chart: $WORK/soak.png; logs: $WORK"
failed=""
[ "$ok" = True ] || failed+=" verify"
[ -z "$gen_failed" ] || failed+=" generators:$gen_failed"
[ "$dead" = 0 ] || failed+=" dead-lettered"
[ -z "$growth" ] || failed+=" growth"
grep -q FAILED "$FAULTS" && failed+=" fault"
if [ -n "$failed" ]; then echo "soak: FAILED ($failed )"; exit 1; fi
echo "soak: ok"
