# One image for all flowmesh binaries (every service, verify, dead-letters, services). Pick one
# with the container's command.
#
# Stage 1 keeps of the workspace only what building the dependencies needs: every manifest, the
# lock file, the migrations, and each target as an empty stub. Its result changes only when a
# manifest does, so stage 2's dependency layer is reused until then; stage 2 then builds the
# real sources on top. Nothing here names a crate but the bench (not shipped): a new one is
# built and shipped as it is.
FROM rust:1.95-slim-bookworm AS manifests
WORKDIR /src
COPY . .
RUN find . -name '*.rs' | while read -r file; do \
      case $file in \
        */src/lib.rs) : > "$file" ;; \
        */src/main.rs|*/src/bin/*.rs) echo 'fn main() {}' > "$file" ;; \
        *) rm "$file" ;; \
      esac; \
    done \
 && find . -type f ! -name '*.rs' ! -name Cargo.toml ! -name Cargo.lock ! -path '*/migrations/*' -delete \
 && find . -depth -type d -empty -delete

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY --from=manifests /src ./
RUN cargo build --release --locked --workspace --bins --exclude flowmesh-bench
COPY . .
# Make cargo see the real sources as newer than the stubs; then every binary but the bench's (a
# tool for a developer's machine, not shipped; it alone needs the OTLP receiver's protobuf).
RUN find . -name '*.rs' -not -path './target/*' -exec touch {} + \
 && cargo build --release --locked --workspace --bins --exclude flowmesh-bench \
 && mkdir /out \
 && find target/release -maxdepth 1 -type f -perm -u+x -exec cp {} /out/ \;

FROM debian:bookworm-slim AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/flowmesh --create-home flowmesh \
 && install -d -o flowmesh -g flowmesh /var/lib/flowmesh/filter /var/lib/flowmesh/spool
COPY --from=build /out/ /usr/local/bin/
USER flowmesh
WORKDIR /var/lib/flowmesh
ENV LOG_FORMAT=json RUST_LOG=info
