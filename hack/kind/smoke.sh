#!/usr/bin/env bash
# A quick smoke check of the product as users run it, on the offline kind cluster: the
# repository's image, the chart's DaemonSet on every node and its janitor, and the
# example pool served. One call from nothing (about 1.5 min with the node image cached);
# the full end-to-end suite on the same cluster is hack/kind/test.sh.
#
#   1. hack/kind/cluster.sh up            (engine, node image, 3 nodes Ready; cached)
#   2. hack/kind/image.sh load            (release binary, image, kind load)
#   3. helm upgrade --install charts/portassign with that image (pullPolicy Never); the
#      DaemonSet Ready on every node, the control plane included; the janitor available
#   4. examples/pool.yaml for every node: Ready=True, one port per key, inside the range;
#      then deleted (its finalizer released by the agent)
#   5. hack/kind/cluster.sh down, unless KEEP_CLUSTER=1 (then the cluster, the release
#      and the engine stay; the kubeconfig is ~/.cache/portassign/kind/<cluster>.kubeconfig)
#
# Environment: KEEP_CLUSTER, KIND_CLUSTER, PORTASSIGN_BINARY (skip the cargo build),
# HELM and KUBECTL (default: built by hack/build-tools.sh), E2E_TIMEOUT (seconds to wait
# for any one thing, default 180), and those of lib.sh and cluster.sh.
set -euo pipefail
# shellcheck disable=SC2034 # used by lib.sh
KLOG_NAME=smoke
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

namespace=portassign
release=portassign
demo=portassign-smoke-demo
timeout=${E2E_TIMEOUT:-180}
started=$(date +%s)
kc=${KIND_KUBECONFIG:-$HOME/.cache/portassign/kind/${KIND_CLUSTER:-portassign}.kubeconfig}

phase() { klog "--- $* (at $(($(date +%s) - started)) s)"; }

finish() {
  local rc=$?
  set +e
  if [ "$rc" -ne 0 ]; then
    klog "FAILED; what the agents say:"
    "$KUBECTL_BIN" --kubeconfig "$kc" get pods -n "$namespace" -o wide >&2
    "$KUBECTL_BIN" --kubeconfig "$kc" describe pods -n "$namespace" | sed -n '/^Events:/,/^$/p' >&2
    "$KUBECTL_BIN" --kubeconfig "$kc" logs -n "$namespace" -l "app.kubernetes.io/instance=$release" --tail=20 --prefix >&2
  fi
  if [ "${KEEP_CLUSTER:-}" = 1 ]; then
    klog "KEEP_CLUSTER=1: cluster kept; KUBECONFIG=$kc"
  else
    "$KIND_DIR/cluster.sh" down
  fi
  if [ "$rc" -eq 0 ]; then klog "PASS in $(($(date +%s) - started)) s"; else klog "FAIL (exit $rc)"; fi
  exit "$rc"
}
KUBECTL_BIN=${KUBECTL:-$(tool kubectl)/kubectl}
HELM_BIN=${HELM:-$(tool helm)/helm}
trap finish EXIT
k() { "$KUBECTL_BIN" --kubeconfig "$kc" "$@"; }

phase "1. cluster"
"$KIND_DIR/cluster.sh" up "$kc" >/dev/null
mapfile -t nodes < <(k get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
klog "nodes: ${nodes[*]}"

phase "2. image"
image=$("$KIND_DIR/image.sh" load | tail -n 1)

phase "3. chart"
# Agents use the node's network: a second release would find its port taken on every node.
others=$(k get daemonsets -A -l app.kubernetes.io/name=portassign --no-headers 2>/dev/null |
  awk -v ns="$namespace" -v r="$release" '!($1 == ns && $2 == r) {print $1 "/" $2}')
[ -z "$others" ] || kdie "another release of the chart runs on this cluster ($others; helm uninstall it first)"
if k get crd portassignments.portassign.io >/dev/null 2>&1; then
  # helm installs a chart's CRDs only when absent; bring an existing one up to date.
  k apply --server-side --force-conflicts -f "$REPO/charts/portassign/crds/" >/dev/null
fi
"$HELM_BIN" upgrade --install "$release" "$REPO/charts/portassign" --kubeconfig "$kc" \
  -n "$namespace" --create-namespace \
  --set image.repository="${image%:*}" --set image.tag="${image##*:}" --set image.pullPolicy=Never >/dev/null
k rollout status "daemonset/$release" -n "$namespace" --timeout="${timeout}s" >&2
ready=$(k get "daemonset/$release" -n "$namespace" -o jsonpath='{.status.numberReady}')
[ "$ready" = "${#nodes[@]}" ] || kdie "$ready agents Ready, want one on each of the ${#nodes[@]} nodes"
k rollout status "deployment/$release-janitor" -n "$namespace" --timeout="${timeout}s" >&2
k get pods -n "$namespace" -o wide >&2

phase "4. example pool on every node"
k create namespace "$demo" --dry-run=client -o yaml | k apply -f - >/dev/null
for node in "${nodes[@]}"; do
  sed -e "s/NODE_NAME/$node/" -e "s/^  name: sandbox-pool/  name: pool-$node/" "$REPO/examples/pool.yaml" |
    k apply -n "$demo" -f - >/dev/null
done
for node in "${nodes[@]}"; do
  k wait --for=condition=Ready "portassignment/pool-$node" -n "$demo" --timeout="${timeout}s" >/dev/null
  ports=$(k get "portassignment/pool-$node" -n "$demo" -o jsonpath='{range .status.ports[*]}{.port} {end}')
  keys=$(k get "portassignment/pool-$node" -n "$demo" -o jsonpath='{.spec.keys[*]}' | wc -w)
  [ "$(wc -w <<< "$ports")" = "$keys" ] || kdie "pool-$node: ports [$ports] for $keys keys"
  for p in $ports; do
    (( p >= 20000 && p <= 29999 )) || kdie "pool-$node: port $p outside the chart's default range"
  done
  klog "pool-$node Ready: ports $ports"
done
k get portassignments -n "$demo" -o wide >&2
k delete namespace "$demo" --timeout="${timeout}s" >/dev/null
klog "example pools deleted (finalizers released)"

phase "5. done"
