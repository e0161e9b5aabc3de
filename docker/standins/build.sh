#!/usr/bin/env bash
# Builds, under the official names, the local stand-ins for every image the compose file and the
# Dockerfile name, for a machine whose Docker engine reaches no registry. Each image is built
# once per machine and reused afterwards; what a Dockerfile here says in its first line is how
# it differs from the image it replaces. Needs root (debootstrap) and, for the Rust builder, this
# machine's Rust 1.95 toolchain under rustup.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
log() { printf '[standins] %s\n' "$*" >&2; }
have() { docker image inspect "$1" >/dev/null 2>&1; }

# This network's extra CA certificates, for the stand-ins that fetch over HTTPS (cargo, pip).
ca_files() {
  mkdir -p "$1/ca"
  cp /usr/local/share/ca-certificates/*.crt "$1/ca/" 2>/dev/null || true
}

build() { # tag dir [docker build options]: the stand-in in docker/standins/dir, unless tag exists
  local tag=$1 dir=$2 ctx
  if have "$tag"; then return 0; fi
  ctx=$(mktemp -d)
  cp -a "$here/$dir/." "$ctx/"
  ca_files "$ctx"
  if [ "$dir" = rust ]; then
    local toolchain
    toolchain=$(rustup run 1.95 rustc --print sysroot 2>/dev/null || rustc --print sysroot)
    mkdir -p "$ctx/toolchain"
    for part in bin lib libexec etc; do
      [ -d "$toolchain/$part" ] && cp -a "$toolchain/$part" "$ctx/toolchain/"
    done
  fi
  log "building $tag (stand-in, once per machine)"
  local started=$SECONDS
  if ! docker build -q -t "$tag" "${@:3}" "$ctx" >/dev/null; then
    rm -rf "$ctx"; log "building $tag failed"; return 1
  fi
  rm -rf "$ctx"
  log "built $tag in $((SECONDS - started)) s"
}

if ! have debian:bookworm-slim; then
  log "building debian:bookworm-slim from debootstrap (stand-in, once per machine)"
  bash "$here/base.sh" debian:bookworm-slim
fi
if ! have debian:trixie-slim; then
  log "building debian:trixie-slim from debootstrap (stand-in, once per machine)"
  bash "$here/base.sh" debian:trixie-slim trixie
fi
build rust:1.95-slim-bookworm rust
build rabbitmq:3.13-management rabbitmq
build rabbitmq:4.0-management rabbitmq --build-arg DEBIAN=trixie
build postgres:16 postgres
build mongo:7 mongo
build prom/prometheus:v2.53.0 prometheus
