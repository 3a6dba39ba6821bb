#!/usr/bin/env bash
# Builds the product image offline with the repository's Dockerfile and prints its name;
# with `load`, also loads it into the kind cluster of hack/kind/cluster.sh.
#
#   hack/kind/image.sh [build]    build only
#   hack/kind/image.sh load       build, then `kind load docker-image` into $KIND_CLUSTER
#
# The image is the Dockerfile's runtime stage (the one users get), reached by its offline
# path (`--target prebuilt`, legacy builder, nothing pulled):
#   - the binary: `cargo build --release --locked --bin portassign` on this host
#     (PORTASSIGN_BINARY=path skips the build and uses that file);
#   - the runtime base standing in for gcr.io/distroless/cc-debian12:nonroot: a `docker
#     import` of the host's Debian glibc and libgcc_s libraries (packages libc6 and
#     libgcc-s1), a CA bundle, /etc/passwd and /etc/group with nonroot (65532), /tmp and
#     /home/nonroot. Cached in the engine as portassign/runtime-base:<key>.
#
# Environment: PORTASSIGN_IMAGE (default portassign:dev-<first 12 hex digits of the
# binary's sha256>, so a new binary is a new tag), PORTASSIGN_BINARY, CARGO_TARGET_DIR,
# KIND_CLUSTER (for load), and those of lib.sh.
set -euo pipefail
# shellcheck disable=SC2034 # used by lib.sh
KLOG_NAME=image
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

mode=${1:-build}
case "$mode" in build|load) ;; *) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;; esac

# The packages whose files make the runtime base, as in distroless/cc.
base_packages=(libc6 libgcc-s1)

# runtime_base: build (once per package versions and version of this script) and print
# the local runtime base image.
runtime_base() {
  local versions key tag
  versions=$(dpkg-query -W -f '${Package}=${Version}\n' "${base_packages[@]}" ca-certificates) ||
    kdie "the runtime base is made from the host's Debian packages: ${base_packages[*]} ca-certificates"
  key=$( { echo "$versions"; sed -n '/^runtime_base()/,/^}/p' "${BASH_SOURCE[0]}"; } | sha256sum | cut -c1-12)
  tag="portassign/runtime-base:$key"
  if docker image inspect "$tag" >/dev/null 2>&1; then echo "$tag"; return; fi
  klog "making the runtime base $tag from the host's ${base_packages[*]}"
  local root f
  root=$(mktemp -d "${TMPDIR:-/tmp}/portassign-runtime-base.XXXXXX")
  # Shared libraries and the loader's configuration; not gconv modules, audit or
  # debugging helpers, which distroless leaves out too.
  while read -r f; do
    [ -f "$f" ] || continue
    mkdir -p "$root$(dirname "$f")"
    cp -L "$f" "$root$f"
  done < <(dpkg -L "${base_packages[@]}" | grep -E '\.so(\.[0-9]+)*$|^/etc/ld\.so\.conf' | grep -v -E '/gconv/|/audit/|libmemusage|libpcprofile|libc_malloc_debug|libthread_db')
  mkdir -p "$root/etc/ssl/certs" "$root/tmp" "$root/home/nonroot" "$root/var/run"
  cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$root/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' > "$root/etc/group"
  echo 'hosts: files dns' > "$root/etc/nsswitch.conf"
  chmod 1777 "$root/tmp"
  chown 65532:65532 "$root/home/nonroot"
  chmod 0700 "$root/home/nonroot"
  tar -C "$root" --numeric-owner -c . | docker import - "$tag" >/dev/null
  rm -rf "$root"
  echo "$tag"
}

binary=${PORTASSIGN_BINARY:-}
if [ -z "$binary" ]; then
  klog "cargo build --release --locked --bin portassign"
  (cd "$REPO" && cargo build --release --locked --bin portassign >&2)
  binary=${CARGO_TARGET_DIR:-$REPO/target}/release/portassign
fi
[ -x "$binary" ] || kdie "no executable binary at $binary"
# Anything the binary links beyond the base's libraries would fail at start; say so now.
missing=$(ldd "$binary" 2>/dev/null | awk '$2 == "=>" {print $1}' | grep -v -E '^(libc|libm|libgcc_s|libdl|libpthread|librt|libresolv|libutil|libnsl|libanl|libBrokenLocale|libmvec|libnss_[a-z]+)\.so' || true)
[ -z "$missing" ] || kdie "the binary links libraries the runtime base lacks: $missing"

ctx=""
# An engine started for this build (so no cluster runs on it) stops again afterwards.
cleanup() { [ -z "$ctx" ] || rm -rf "$ctx"; engine_release; }
trap cleanup EXIT
engine_up
base=$(runtime_base)
image=${PORTASSIGN_IMAGE:-portassign:dev-$(sha256sum "$binary" | cut -c1-12)}
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$REPO/Cargo.toml" | head -n 1)

# A context of its own: the Dockerfile, its .dockerignore and the binary where the
# prebuilt stage expects it, wherever CARGO_TARGET_DIR put it (and no walk through a
# target directory of gigabytes).
ctx=$(mktemp -d "${TMPDIR:-/tmp}/portassign-image.XXXXXX")
cp "$REPO/Dockerfile" "$REPO/.dockerignore" "$ctx/"
mkdir -p "$ctx/target/release"
cp "$binary" "$ctx/target/release/portassign"
klog "docker build --target prebuilt -t $image (runtime base $base)"
DOCKER_BUILDKIT=0 docker build -q --target prebuilt --build-arg "RUNTIME_BASE=$base" \
  --build-arg "VERSION=$version" -t "$image" "$ctx" >/dev/null

if [ "$mode" = load ]; then
  "$KIND_DIR/cluster.sh" load "$image"
fi
echo "$image"
