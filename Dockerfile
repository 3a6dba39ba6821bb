# syntax=docker/dockerfile:1
# The portassign agent image.
#
#   docker build -t portassign:0.2.0 .
#
# builds the binary in a Rust stage and puts it on gcr.io/distroless/cc-debian12:nonroot:
# the image users get (BuildKit, the default builder of current Docker releases).
#
# Offline (no registry; works with the legacy builder too): the binary built on the host
# and a local stand-in for the distroless base, in the same runtime stage:
#
#   cargo build --release --locked --bin portassign
#   DOCKER_BUILDKIT=0 docker build --target prebuilt \
#     --build-arg RUNTIME_BASE=<local image: glibc, libgcc_s, CA bundle, user nonroot 65532> \
#     -t portassign:dev .
#
# hack/kind/image.sh does exactly that (it makes the base from the host's Debian
# packages) and loads the image into the kind cluster of hack/kind/cluster.sh. The stages
# are ordered so that the legacy builder, which builds every stage up to its target,
# never reaches the Rust stage on the offline path.

ARG RUNTIME_BASE=gcr.io/distroless/cc-debian12:nonroot

# Runtime stage, shared by both paths: the binary links glibc (and libgcc_s)
# dynamically, so distroless/cc rather than distroless/static. Nothing else: no shell, no
# package manager. The binary is added by the stages below.
FROM ${RUNTIME_BASE} AS runtime
ARG VERSION=0.2.0
LABEL org.opencontainers.image.title="portassign" \
      org.opencontainers.image.description="Kubernetes node agent that hands out host ports verified free on each node" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# nonroot is UID/GID 65532, the user the Helm chart runs the agent as.
USER nonroot:nonroot
EXPOSE 9477
ENTRYPOINT ["/portassign"]
CMD ["agent"]

# Offline path (--target prebuilt): the release binary cargo built on the host.
FROM runtime AS prebuilt
COPY target/release/portassign /portassign

# Build stage: a release build of the root package with the locked dependency set. The
# whole workspace is copied (see .dockerignore) because cargo loads every member's
# manifest, and the root package's path dependencies, even to build one package. The
# cache mounts keep the registry and target directory between builds (BuildKit); the
# binary is copied out of the cached target directory because cache mounts are not part
# of the image. The build script of crates/kubelet-plugin downloads the kubelet's DRA
# .proto files (k8s.io/kubelet at a pinned version, checksummed) from the Go module proxy
# (GOPROXY, default proxy.golang.org).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --package portassign --bin portassign \
    && install -D -m 0755 target/release/portassign /out/portassign

# The image users get (the default, last stage): the runtime stage with that binary.
FROM runtime
COPY --from=build /out/portassign /portassign
