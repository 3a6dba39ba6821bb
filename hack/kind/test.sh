#!/usr/bin/env bash
# The kind stage of `make test` (also `make e2e-kind`): the product as users install it.
# Builds and starts what is needed, then hands over to the Rust end-to-end suite; it
# asserts nothing itself.
#
#   1. hack/kind/cluster.sh up      the offline kind cluster (engine, node image; cached)
#   2. hack/kind/image.sh load      the repository's image, loaded into every node; and the
#                                   same runtime stage around e2e's sandbox stand-in
#   3. the previous release (hack/kind/previous.sh: its source from git history, its
#      agent binary; cached) and its image, for the upgrade test
#   4. cargo test -p portassign-e2e --features kind, with the kind provider: the suite
#      (e2e/tests/suite.rs), the upgrade from the previous release (e2e/tests/upgrade.rs)
#      and the real-pod scenarios (e2e/tests/kind.rs), against the chart's DaemonSet
#      running that image
#   5. hack/kind/cluster.sh down    unless KEEP_CLUSTER=1 (then the kubeconfig is printed)
#
# Environment: KEEP_CLUSTER; KIND_ONLY=<test> runs only that ignored test of
# e2e/tests/kind.rs after step 2 (`make bench-kind`, `make e2e-kind-dra`); and those of
# cluster.sh and image.sh.
set -euo pipefail
# shellcheck disable=SC2034 # used by lib.sh
KLOG_NAME=kind-test
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"
started=$(date +%s)
phase() { klog "--- $* (at $(($(date +%s) - started)) s)"; }

finish() {
  local rc=$?
  set +e
  if [ "${KEEP_CLUSTER:-}" = 1 ]; then
    klog "KEEP_CLUSTER=1: cluster kept; KUBECONFIG=${kubeconfig:-?}"
  else
    "$KIND_DIR/cluster.sh" down
  fi
  klog "$([ "$rc" -eq 0 ] && echo PASS || echo "FAIL (exit $rc)") in $(($(date +%s) - started)) s"
  exit "$rc"
}
trap finish EXIT

phase "cluster"
kubeconfig=$("$KIND_DIR/cluster.sh" up | tail -n 1)
phase "images"
image=$("$KIND_DIR/image.sh" load | tail -n 1)
# The suite drives the cluster with `kubectl portassign`, the binary built here; the
# scenarios start sandbox pods from the same runtime stage with e2e's stand-in binary.
cargo build --locked --bin portassign
cargo build --locked -p portassign-e2e --bin sandbox
sandbox=$(PORTASSIGN_BINARY=${CARGO_TARGET_DIR:-$REPO/target}/debug/sandbox PORTASSIGN_IMAGE=portassign-e2e-sandbox:dev \
  "$KIND_DIR/image.sh" load | tail -n 1)
if [ -n "${KIND_ONLY:-}" ]; then
  # One ignored test of e2e/tests/kind.rs alone: `make bench-kind` (the DRA pod-start
  # benchmark, docs/dra-benchmark.md) or `make e2e-kind-dra` (the DRA scenarios, which
  # make test runs inside the main kind test).
  phase "$KIND_ONLY alone (image $image)"
  PORTASSIGN_E2E_PROVIDER=kind PORTASSIGN_E2E_KUBECONFIG=$kubeconfig PORTASSIGN_E2E_IMAGE=$image \
    PORTASSIGN_E2E_SANDBOX_IMAGE=$sandbox \
    cargo test --locked -p portassign-e2e --features kind --test kind -- --ignored --nocapture --exact "$KIND_ONLY"
  exit 0
fi
phase "the previous release, for the upgrade test"
previous=$("$KIND_DIR/previous.sh")
previous_src=$(sed -n 1p <<<"$previous")
previous_image=$(PORTASSIGN_BINARY=$(sed -n 2p <<<"$previous") PORTASSIGN_IMAGE=portassign:0.1.0-previous \
  "$KIND_DIR/image.sh" load | tail -n 1)
phase "end-to-end suite, upgrade and real-pod scenarios (kind provider, image $image)"
export PORTASSIGN_E2E_PROVIDER=kind PORTASSIGN_E2E_KUBECONFIG=$kubeconfig PORTASSIGN_E2E_IMAGE=$image \
  PORTASSIGN_E2E_SANDBOX_IMAGE=$sandbox PORTASSIGN_E2E_PREVIOUS_SRC=$previous_src \
  PORTASSIGN_E2E_PREVIOUS_IMAGE=$previous_image
# The suite first, then the upgrade (it reinstalls the release from the previous chart);
# the scenarios last: they end by deleting a worker node.
cargo test --locked -p portassign-e2e --features kind --test suite -- --nocapture
cargo test --locked -p portassign-e2e --features kind --test upgrade -- --nocapture
cargo test --locked -p portassign-e2e --features kind --test kind -- --nocapture
