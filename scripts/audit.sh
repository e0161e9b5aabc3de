#!/usr/bin/env bash
# Audits Cargo.lock against the RustSec advisory database with cargo-audit (installed when
# missing). Offline against the snapshot in ADVISORY_DB_BUNDLE (default
# ../shared/advisory-db/advisory-db.bundle, a git bundle) when it exists; otherwise cargo-audit
# fetches the database itself. Ignored advisories live in .cargo/audit.toml with their reasons,
# and this script fails if a crate an ignore relies on ever gets compiled.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[audit] %s\n' "$*" >&2; }

if ! cargo audit --version >/dev/null 2>&1; then
  log "installing cargo-audit (once per machine)"
  cargo install --locked --quiet cargo-audit
fi

# An ignore is only sound while the crate it concerns is not built: check that it is not.
for crate in rsa; do
  if cargo tree -i "$crate" --target all -e normal,build 2>/dev/null | grep -q .; then
    log "$crate is compiled now: the ignore in .cargo/audit.toml no longer holds"; exit 1
  fi
done

BUNDLE=${ADVISORY_DB_BUNDLE:-../shared/advisory-db/advisory-db.bundle}
if [ -f "$BUNDLE" ]; then
  DB=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/advisory-db
  rm -rf "$DB"
  git -c advice.detachedHead=false -c init.defaultBranch=main clone --quiet "$BUNDLE" "$DB"
  log "RustSec advisory database snapshot at commit $(git -C "$DB" rev-parse HEAD) ($(git -C "$DB" log -1 --format=%cs))"
  cargo audit --db "$DB" --no-fetch --stale
else
  log "no snapshot at $BUNDLE: cargo-audit fetches the database"
  cargo audit
fi
