#!/usr/bin/env bash
# `make test`: lint, then every test against one real local control plane
# (etcd + kube-apiserver built from Go modules, see hack/build-tools.sh), shared by
# all test binaries through PORTASSIGN_TEST_KUBECONFIG. Set PORTASSIGN_TEST_KUBECONFIG
# yourself to run the same tests against an existing cluster instead.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
step() { printf '\n== %s (%ss)\n' "$*" "$(( $(date +%s) - started ))"; }

step "tools (cached after the first build)"
hack/build-tools.sh >/dev/null

step "format and clippy"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings

if [ -z "${PORTASSIGN_TEST_KUBECONFIG:-}" ]; then
  step "control plane"
  cp_dir=$(mktemp -d /tmp/portassign-cp.XXXXXX)
  trap 'hack/control-plane.sh down "$cp_dir"' EXIT
  export PORTASSIGN_TEST_KUBECONFIG
  PORTASSIGN_TEST_KUBECONFIG=$(hack/control-plane.sh up "$cp_dir")
fi

step "unit, property and integration tests"
cargo test --all-targets --locked

if [ -x hack/test-chart.sh ]; then
  step "Helm chart, install and RBAC"
  KUBECONFIG=$PORTASSIGN_TEST_KUBECONFIG hack/test-chart.sh
fi

step "end-to-end suite (local provider: chart installed, agents under its ServiceAccount)"
E2E_KUBECONFIG=$PORTASSIGN_TEST_KUBECONFIG hack/e2e-local.sh

step "all tests passed in $(( $(date +%s) - started ))s"
