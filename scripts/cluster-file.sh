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

file_reconciled() { # the generators stop (they drain); verify each source in a container
  local g n
  compose stop "${GENERATORS[@]}" >/dev/null || return 1
  for g in "${GENERATORS[@]}"; do
    n=$(generated "$g") || return 1
    log "$g made seqs 1..$n"
    verify_in_container "cluster-${g#generator-}" "$n" || return 1
  done
}

whole_file() {
  local started=$SECONDS failed="" check
  log "stage 1: the whole cluster file in containers"
  # The project's image (cached where scripts/compose-check.sh built it already).
  compose build >/dev/null || failed="building the image"
  for check in "compose up -d" "healthy 300 ${FILE_SERVICES[*]}" "targets_up 12" \
    "flowing_all 3000" node_of_filter_killed file_reconciled "json_logs ${FILE_MESH[*]}"; do
    [ -z "$failed" ] || break
    log "file: $check"
    # shellcheck disable=SC2086 # each check is a command and its words
    $check || failed=$check
  done
  keep_logs file-
  compose down -v >/dev/null 2>&1 || true
  local line="whole file      every service healthy, Prometheus up on 12 targets, the filter's node killed, 3 sources verified in a container  $((SECONDS - started)) s  "
  if [ -z "$failed" ]; then line+="ok"; else line+="FAILED ($failed)"; FAILED=1; fi
  RESULTS+=("$line")
  log "$line"
}
