#!/usr/bin/env bash
# Runs the whole test suite against real RabbitMQ, PostgreSQL and a MongoDB-speaking server
# (installed and started when missing): unit, in-process integration and end-to-end tests, a
# WebSocket client written in Python that checks the filter's protocol from outside, the
# chaos suite (part of it twice: once with packed RabbitMQ messages), and the compose file run
# for real in Docker.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/deps.sh

export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export DATABASE_URL=${DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/flowmesh}

# MONGODB_URL set to an empty string on purpose skips the real-MongoDB tests; unset, it is the
# server deps.sh started.
if [ -z "${MONGODB_URL-unset}" ]; then
  echo "[test] MONGODB_URL is empty: the real-MongoDB tests will be SKIPPED" >&2
else
  export MONGODB_URL=${MONGODB_URL:-mongodb://127.0.0.1:27017}
fi

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --all-features --no-fail-fast
else
  cargo test --workspace --all-features --no-fail-fast
fi

if [ -z "${MONGODB_URL:-}" ]; then
  echo "[test] note: the real-MongoDB tests were SKIPPED (MONGODB_URL empty)" >&2
fi

bash scripts/protocol-check.sh

bash scripts/observability-check.sh

# The chaos suite (about ten minutes; it stops and starts RabbitMQ and PostgreSQL on this
# machine, so it needs root). CHAOS=0 skips it for a quick local run.
# Then four of its scenarios with the filter packing broker-bound records (FILTER_PUBLISH_PACK,
# docs/contracts.md §4), at 3 000 records/s so that frames, and so messages, hold several.
if [ "${CHAOS:-1}" != 0 ]; then
  bash scripts/chaos.sh
  FILTER_PUBLISH_PACK=100 CHAOS_RATE=3000 CHAOS_COUNT=30000 \
    bash scripts/chaos.sh kill-filter rabbitmq-restart kill-pg-writer kill-mongo-writer
fi

# The project's own Dockerfile and docker-compose.yml, run for real, when a Docker engine answers
# (it says plainly when it skipped). COMPOSE=0 skips it.
if [ "${COMPOSE:-1}" != 0 ]; then
  bash scripts/compose-check.sh
else
  echo "[test] COMPOSE=0: the docker compose check was SKIPPED" >&2
fi
