# Stage 1 of scripts/cluster-check.sh, sourced by it: docker-compose.cluster.yml as a user runs
# it, every service in a container. Uses the check's compose, cluster_whole, ip_of, RESULTS and
# FAILED, and scripts/compose-lib.sh.
# shellcheck shell=bash

acked_all() { # records acked so far, summed over the file's generators
  local g total=0
  for g in "${GENERATORS[@]}"; do total=$((total + $(generator_acked "$(ip_of "$g"):9101"))); done
  echo "$total"
}

flowing_all() { # COUNT more records acked across the generators, within 120 s
  local want=$(($(acked_all) + $1)) deadline=$((SECONDS + 120))
  until [ "$(acked_all)" -ge "$want" ]; do
    [ "$SECONDS" -ge "$deadline" ] && { log "fewer than $1 records acked in 120 s"; return 1; }
    sleep 1
  done
}

filter_node() { # the node the filter is connected to (its flowmesh_amqp_node gauge at 1)
  curl -fsS --max-time 5 "http://127.0.0.1:$FLOWMESH_FILTER_PROBE_PORT/metrics" 2>/dev/null |
    awk '/^flowmesh_amqp_node\{/ && $2 == 1 { match($0, /node="[^":]+/); print substr($0, RSTART + 6, RLENGTH - 6); exit }'
}

node_of_filter_killed() { # the filter's node killed; the filter moves, records keep flowing
  local victim now
  victim=$(filter_node)
  [ -n "$victim" ] || { log "the filter names no node in its metrics"; return 1; }
  log "docker kill $victim (the filter's node)"
  docker kill "$(cid "$victim")" >/dev/null || return 1
  flowing_all 1000 || return 1
  now=$(filter_node)
  log "the filter moved from $victim to ${now:-nothing}"
  [ -n "$now" ] && [ "$now" != "$victim" ] || return 1
  docker start "$(cid "$victim")" >/dev/null || return 1
  FAULT_FAILED=""
  cluster_whole
  [ -z "$FAULT_FAILED" ] && flowing_all 1000
}

FILTER_URLS=(ws://filter:8080/ingest ws://filter-2:8080/ingest)
partition_stored() { # ADDR [PARTITION]: records a mongo-writer stored from its partitions (or one)
  curl -fsS "http://$1/metrics" 2>/dev/null | awk -v p="${2:-}" '
    /^flowmesh_writer_partition_records_total/ && (p == "" || index($0, "partition=\"" p "\"")) { s += $NF }
    END { print s + 0 }'
}
home_of() { # SOURCE URL… → the URL ranked first for SOURCE (docs/contracts.md §2)
  local source=$1 url; shift
  for url in "$@"; do
    printf '%s %s\n' "$(printf '%s\n%s' "$source" "$url" | md5sum | cut -c1-16)" "$url"
  done | sort -r | head -1 | cut -d' ' -f2
}
generator_metric() { # GENERATOR NAME[{LABELS}]: one sample of a generator container's metrics
  curl -fsS --max-time 5 "http://$(ip_of "$1"):9101/metrics" 2>/dev/null |
    awk -v n="$2" '$1 == n { v = $2 } END { printf "%d\n", v }'
}
at_home_within() { # SECONDS GENERATOR…: each one's link back at its home filter
  local deadline=$((SECONDS + $1)) g; shift
  for g in "$@"; do
    until [ "$(generator_metric "$g" flowmesh_generator_filter_home)" = 1 ]; do
      [ "$SECONDS" -ge "$deadline" ] && { log "$g is not at its home filter"; return 1; }
      sleep 1
    done
  done
}
FILE_NOTES=()
# Fault 7 in containers: docker kill of a filter that is home to some sources, started again
# after 20 s. Its generators fail over (GENERATOR_FAILOVER_AFTER, 10 s), records keep flowing,
# and once it is healthy they come home.
filter_killed() {
  local victim=filter-2 g homed=() switched
  [ -n "$(for g in "${GENERATORS[@]}"; do home_of "cluster-${g#generator-}" "${FILTER_URLS[@]}"; done | grep -F "//$victim:")" ] || victim=filter
  for g in "${GENERATORS[@]}"; do
    [ "$(home_of "cluster-${g#generator-}" "${FILTER_URLS[@]}")" = "ws://$victim:8080/ingest" ] && homed+=("$g")
  done
  log "docker kill $victim (home of ${homed[*]})"
  docker kill "$(cid "$victim")" >/dev/null || return 1
  sleep 20
  for g in "${homed[@]}"; do
    switched=$(generator_metric "$g" 'flowmesh_generator_filter_switches_total{reason="failover"}')
    [ "$switched" -ge 1 ] || { log "$g did not fail over"; return 1; }
  done
  flowing_all 1000 || return 1
  docker start "$(cid "$victim")" >/dev/null || return 1
  healthy 120 "$victim" && at_home_within 60 "${GENERATORS[@]}" || return 1
  FILE_NOTES+=("$victim killed: ${homed[*]} failed over and came home")
}
# Fault 8 in containers: docker kill of the mongo-writer active on partition 0 (the one whose
# partition counter grows); the other takes the partition over while it is away.
mongo_writer_killed() {
  local a b victim=mongo-writer standby=mongo-writer-2 before after
  a=$(partition_stored "$(ip_of mongo-writer):9104" 0) b=$(partition_stored "$(ip_of mongo-writer-2):9104" 0)
  sleep 3
  if [ "$(partition_stored "$(ip_of mongo-writer-2):9104" 0)" -gt "$b" ] &&
    [ "$(partition_stored "$(ip_of mongo-writer):9104" 0)" -eq "$a" ]; then
    victim=mongo-writer-2 standby=mongo-writer
  fi
  before=$(partition_stored "$(ip_of "$standby"):9104")
  log "docker kill $victim (active on partition 0); $standby stands by"
  docker kill "$(cid "$victim")" >/dev/null || return 1
  flowing_all 2000 || return 1
  after=$(partition_stored "$(ip_of "$standby"):9104")
  [ "$after" -gt "$before" ] || { log "$standby stored nothing while $victim was away"; return 1; }
  docker start "$(cid "$victim")" >/dev/null || return 1
  healthy 120 "$victim" || return 1
  FILE_NOTES+=("$victim killed: $standby stored $((after - before)) records meanwhile")
}
# Fault 9 in containers: pg-writers 1 → 3 → 1 while records flow (docker compose up --scale).
pg_writers_scaled() {
  local n
  log "pg-writers: 1 → 3"
  compose up -d --no-deps --no-recreate --scale pg-writer=3 pg-writer >/dev/null 2>&1 || return 1
  n=$(compose ps -q pg-writer | wc -l)
  [ "$n" = 3 ] || { log "$n pg-writers run, not 3"; return 1; }
  flowing_all 2000 || return 1
  log "pg-writers: 3 → 1"
  compose up -d --no-deps --no-recreate --scale pg-writer=1 pg-writer >/dev/null 2>&1 || return 1
  n=$(compose ps -q pg-writer | wc -l)
  [ "$n" = 1 ] || { log "$n pg-writers run, not 1"; return 1; }
  flowing_all 1000 || return 1
  FILE_NOTES+=("pg-writers scaled 1 → 3 → 1")
}

file_reconciled() { # the generators stop (they drain); verify each source in a container
  local g n
  compose stop "${GENERATORS[@]}" >/dev/null || return 1
  for g in "${GENERATORS[@]}"; do
    n=$(generated "$g") || return 1
    log "$g made seqs 1..$n"
    VERIFY_IN=verify verify_in_container "cluster-${g#generator-}" "$n" || return 1
  done
}

whole_file() {
  local started=$SECONDS failed="" check
  log "stage 1: the whole cluster file in containers"
  # The project's image (cached where scripts/compose-check.sh built it already).
  compose build >/dev/null || failed="building the image"
  FILE_NOTES=()
  for check in "compose up -d" "healthy 300 ${FILE_SERVICES[*]}" "targets_up 14" \
    "flowing_all 3000" node_of_filter_killed filter_killed mongo_writer_killed pg_writers_scaled \
    file_reconciled "json_logs ${FILE_MESH[*]}"; do
    [ -z "$failed" ] || break
    log "file: $check"
    # shellcheck disable=SC2086 # each check is a command and its words
    $check || failed=$check
  done
  keep_logs file-
  compose down -v >/dev/null 2>&1 || true
  local line="whole file      every service healthy, Prometheus up on 14 targets, the filter's node killed, 3 sources verified in a container  $((SECONDS - started)) s  "
  if [ -z "$failed" ]; then line+="ok"; else line+="FAILED ($failed)"; FAILED=1; fi
  [ ${#FILE_NOTES[@]} -eq 0 ] || line+=" ($(IFS=';'; echo "${FILE_NOTES[*]}" | sed 's/;/; /g'))"
  RESULTS+=("$line")
  log "$line"
}
