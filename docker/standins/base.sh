#!/usr/bin/env bash
# Builds the local Debian base image that stands in for `debian:<suite>-slim` on a machine whose
# Docker engine can reach no registry: a minimal root of that Debian release made with
# debootstrap from the Debian mirror apt already uses, imported under the official name. Not
# used where a registry answers (the official image is pulled instead). Needs root and
# debootstrap. Usage: base.sh [TAG [SUITE]] (default debian:bookworm-slim, bookworm).
set -euo pipefail
tag=${1:-debian:bookworm-slim}
suite=${2:-bookworm}
# The mirror apt uses on this machine (DEBIAN_MIRROR overrides it).
mirror=${DEBIAN_MIRROR:-$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
  | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -1 | tr -d ' ' || true)}
mirror=${mirror:-http://deb.debian.org/debian}
mirror=${mirror%/}
if ! command -v debootstrap >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null 2>&1 \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase "$suite" "$root" "$mirror" >/dev/null
security=${mirror%/debian*}/debian-security
cat >"$root/etc/apt/sources.list" <<SOURCES
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security $suite-security main
SOURCES
: >"$root/etc/resolv.conf"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/*
tar --numeric-owner -C "$root" -c . | docker import -c 'CMD ["bash"]' - "$tag" >/dev/null
