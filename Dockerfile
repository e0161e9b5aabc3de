# One image for all flowmesh binaries: generator, filter, pg-writer, mongo-writer, verify,
# dead-letters. Pick one with the container's command.
#
# Stage 1 builds the dependencies alone (from the manifests and empty sources), so that layer is
# reused until a Cargo.toml or Cargo.lock changes; stage 2 builds the real sources on top.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY common/Cargo.toml common/
COPY generator/Cargo.toml generator/
COPY filter/Cargo.toml filter/
COPY pg-writer/Cargo.toml pg-writer/
COPY mongo-writer/Cargo.toml mongo-writer/
COPY verify/Cargo.toml verify/
COPY bench/Cargo.toml bench/
COPY pg-writer/migrations pg-writer/migrations
RUN for crate in common generator filter pg-writer mongo-writer verify bench; do \
      mkdir -p $crate/src/bin && echo '' > $crate/src/lib.rs && echo 'fn main() {}' > $crate/src/main.rs; \
    done \
 && for bin in dead_letters services; do echo 'fn main() {}' > verify/src/bin/$bin.rs; done \
 && cargo build --release --locked --workspace --bins \
 && rm -rf common/src generator/src filter/src pg-writer/src mongo-writer/src verify/src bench/src
COPY . .
# Make cargo see the real sources as newer than the placeholder build.
RUN find common generator filter pg-writer mongo-writer verify bench -name '*.rs' -exec touch {} + \
 && cargo build --release --locked --workspace --bins

FROM debian:bookworm-slim AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/flowmesh --create-home flowmesh \
 && install -d -o flowmesh -g flowmesh /var/lib/flowmesh/filter /var/lib/flowmesh/spool
COPY --from=build /src/target/release/generator /src/target/release/filter \
     /src/target/release/pg-writer /src/target/release/mongo-writer \
     /src/target/release/verify /src/target/release/dead-letters /usr/local/bin/
USER flowmesh
WORKDIR /var/lib/flowmesh
ENV LOG_FORMAT=json RUST_LOG=info
