#!/usr/bin/env bash
# Fuzzes the filter's frame decoder (fuzz/fuzz_targets/frame.rs) for a bounded time with cargo
# fuzz (libFuzzer) on the nightly toolchain, starting from the seed corpus of real frames in
# fuzz/seeds. Installs cargo-fuzz when missing. A failing input fails the run and is kept under
# fuzz/artifacts/ to replay: cargo +nightly fuzz run frame fuzz/artifacts/frame/<file>.
#
# Environment: FUZZ_SECONDS (default 60).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[fuzz] %s\n' "$*" >&2; }

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  log "cargo fuzz needs the nightly toolchain (rustup toolchain install nightly)"; exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz (once per machine)"
  cargo install --locked --quiet cargo-fuzz
fi
corpus=fuzz/corpus/frame
mkdir -p "$corpus"
cp -n fuzz/seeds/frame/* "$corpus"/
log "fuzzing the frame decoder for ${FUZZ_SECONDS:-60} s"
cargo +nightly fuzz run frame "$corpus" -- \
  -max_total_time="${FUZZ_SECONDS:-60}" -rss_limit_mb=1024 -max_len=65536 -print_final_stats=1
