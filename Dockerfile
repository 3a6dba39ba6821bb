# syntax=docker/dockerfile:1
# The portassign agent image: `docker build -t portassign:0.1.0 .`
#
# Build stage: a release build of the locked dependency set. The cache mounts keep the
# registry and target directory between builds (BuildKit); the binary is copied out of
# the cached target directory because cache mounts are not part of the image.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo.toml declares the benches, so their sources must exist for the manifest to load.
COPY benches ./benches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin portassign \
    && install -D -m 0755 target/release/portassign /out/portassign

# Runtime stage: the binary links glibc (and libgcc_s) dynamically, so distroless/cc
# rather than distroless/static. Nothing else: no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="portassign" \
      org.opencontainers.image.description="Kubernetes node agent that hands out host ports verified free on each node" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/portassign /portassign
# nonroot is UID/GID 65532, the user the Helm chart runs the agent as.
USER nonroot:nonroot
EXPOSE 9477
ENTRYPOINT ["/portassign"]
CMD ["agent"]
