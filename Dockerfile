# syntax=docker/dockerfile:1
# The `flotilla` image: one binary for the coordinator, the agent and the CLI.
#
#   docker build -t flotilla:dev .
#   docker run --rm flotilla:dev --help
#
# Build stage: the workspace needs protoc and the google/protobuf/*.proto
# includes (etcd-client compiles etcd's protos, which import them), and libclang
# (the lint's PostgreSQL parser, crate pg_query, runs bindgen at build time): the
# same Debian packages scripts/test.sh installs.
FROM rust:1.95-bookworm AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev libclang-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The caches keep crates and incremental output between builds of this image;
# the binary is copied out of the cached target dir, which is not in the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --package flotilla --bin flotilla \
    && install -m 0755 target/release/flotilla /usr/local/bin/flotilla

# Runtime stage: glibc and a shell (the compose and Kubernetes files use sh to
# turn a mounted password file into a private pgpass file), nothing else.
FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 flotilla \
    && useradd --system --uid 10001 --gid flotilla --home-dir /var/lib/flotilla \
        --create-home --shell /usr/sbin/nologin flotilla
COPY --from=builder /usr/local/bin/flotilla /usr/local/bin/flotilla
# Numeric, so that Kubernetes' runAsNonRoot can check it without /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/flotilla
# 7070 gRPC (operators, agents, health); 9464 coordinator metrics; 9465 agent metrics.
EXPOSE 7070 9464 9465
ENTRYPOINT ["/usr/local/bin/flotilla"]
CMD ["--help"]
