#!/usr/bin/env bash
# A kind cluster for portassign, built and run offline on this machine (no registry):
#
#   hack/kind/cluster.sh up [KUBECONFIG]   a Docker engine (a private one if none answers,
#                                          see lib.sh), the node image (node-image.sh,
#                                          cached), the cluster of hack/kind/cluster.yaml
#                                          (an existing one is reused), routes between
#                                          the nodes' pod ranges, every node Ready.
#                                          Writes the cluster's kubeconfig to KUBECONFIG
#                                          (default: $KIND_KUBECONFIG, else
#                                          ~/.cache/portassign/kind/<cluster>.kubeconfig)
#                                          and prints its path; ~/.kube/config is never
#                                          touched.
#   hack/kind/cluster.sh down              delete the cluster and stop the private engine
#                                          (KEEP_ENGINE=1 keeps it running).
#   hack/kind/cluster.sh load IMAGE...     `kind load docker-image` into every node.
#   hack/kind/cluster.sh kubeconfig [PATH] write the kubeconfig again; print its path.
#   hack/kind/cluster.sh env               print `export DOCKER_HOST=...` when the private
#                                          engine runs (eval it to use docker by hand).
#
# Environment: KIND_CLUSTER (default portassign), KIND_NODE_IMAGE (default: the one
# node-image.sh builds), KIND_KUBECONFIG, KEEP_ENGINE, KIND_WAIT (seconds for the nodes to
# be Ready, default 300), and those of lib.sh.
set -euo pipefail
# shellcheck disable=SC2034 # used by lib.sh
KLOG_NAME=cluster
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cluster=${KIND_CLUSTER:-portassign}
default_kubeconfig=${KIND_KUBECONFIG:-$HOME/.cache/portassign/kind/$cluster.kubeconfig}

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

cluster_exists() { "$KIND_BIN" get clusters 2>/dev/null | grep -qx "$cluster"; }

write_kubeconfig() {
  local path=$1
  mkdir -p "$(dirname "$path")"
  "$KIND_BIN" get kubeconfig --name "$cluster" > "$path.tmp"
  chmod 0600 "$path.tmp"; mv "$path.tmp" "$path"
}

# pod_routes: without kindnet each node only knows its own pod range; route every other
# node's range via that node (all on the engine's kind bridge).
pod_routes() {
  local kc=$1 rows node ip cidr other
  rows=$("$KUBECTL_BIN" --kubeconfig "$kc" get nodes -o \
    jsonpath='{range .items[*]}{.metadata.name} {.status.addresses[?(@.type=="InternalIP")].address} {.spec.podCIDR}{"\n"}{end}')
  while read -r node ip cidr; do
    [ -n "$cidr" ] || continue
    for other in $(printf '%s\n' "$rows" | awk -v n="$node" '$1 != n {print $1}'); do
      docker exec "$other" ip route replace "$cidr" via "$ip"
    done
  done <<< "$rows"
}

# reregister_nodes KUBECONFIG: a kept cluster whose Node object was deleted (tests of the
# janitor do that) gets it back: the node's kubelet registers it again when restarted.
reregister_nodes() {
  local kc=$1 registered node
  registered=$("$KUBECTL_BIN" --kubeconfig "$kc" get nodes -o name 2>/dev/null) || return 0
  for node in $("$KIND_BIN" get nodes --name "$cluster"); do
    grep -qx "node/$node" <<< "$registered" && continue
    klog "node $node is not registered: restarting its kubelet"
    docker exec "$node" systemctl restart kubelet
  done
}

# wait_ready KUBECONFIG: every node of the cluster registered and Ready.
wait_ready() {
  local kc=$1 deadline want have
  deadline=$(($(date +%s) + ${KIND_WAIT:-300}))
  want=$("$KIND_BIN" get nodes --name "$cluster" | wc -l)
  until have=$("$KUBECTL_BIN" --kubeconfig "$kc" get nodes --no-headers 2>/dev/null | awk '$2 == "Ready"' | wc -l) &&
        [ "$have" -ge "$want" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || {
      "$KUBECTL_BIN" --kubeconfig "$kc" get nodes -o wide >&2 || true
      kdie "only ${have:-0} of $want nodes Ready after ${KIND_WAIT:-300} s"
    }
    # Routes need the pod CIDRs, which the controller manager hands out as nodes join.
    pod_routes "$kc" 2>/dev/null || true
    sleep 2
  done
  pod_routes "$kc"
}

cmd_up() {
  local kc=${1:-$default_kubeconfig} started
  started=$(date +%s)
  engine_up
  KIND_BIN=$(kind_bin); KUBECTL_BIN=$(kubectl_bin)
  if cluster_exists; then
    # Nodes stopped with their engine do not come back reliably: start afresh.
    local all running
    all=$(docker ps -aq --filter "label=io.x-k8s.kind.cluster=$cluster" | wc -l)
    running=$(docker ps -q --filter "label=io.x-k8s.kind.cluster=$cluster" --filter status=running | wc -l)
    if [ "$all" -ne "$running" ]; then
      klog "the kind cluster $cluster has stopped nodes ($running of $all running): recreating it"
      "$KIND_BIN" delete cluster --name "$cluster" --kubeconfig "$kc" >&2
    fi
  fi
  if cluster_exists; then
    klog "reusing the kind cluster $cluster"
  else
    local image=${KIND_NODE_IMAGE:-}
    [ -n "$image" ] || image=$("$KIND_DIR/node-image.sh" | tail -n 1)
    klog "creating the kind cluster $cluster from $image"
    mkdir -p "$(dirname "$kc")"
    "$KIND_BIN" create cluster --name "$cluster" --image "$image" \
      --config "$KIND_DIR/cluster.yaml" --kubeconfig "$kc" --wait 0s >&2
  fi
  write_kubeconfig "$kc"
  reregister_nodes "$kc"
  wait_ready "$kc"
  "$KUBECTL_BIN" --kubeconfig "$kc" get nodes -o wide >&2
  klog "cluster $cluster up with every node Ready in $(($(date +%s) - started)) s; KUBECONFIG=$kc"
  echo "$kc"
}

cmd_down() {
  local kind
  # Nothing to delete (and no engine to start) when the engine is not running.
  if [ -S "$PRIVATE_SOCK" ] && DOCKER_HOST="unix://$PRIVATE_SOCK" docker info >/dev/null 2>&1; then
    export DOCKER_HOST="unix://$PRIVATE_SOCK"
  elif ! docker info >/dev/null 2>&1; then
    klog "no Docker engine runs: no cluster to delete"
    return 0
  fi
  kind=$(kind_bin)
  if "$kind" get clusters 2>/dev/null | grep -qx "$cluster"; then
    klog "deleting the kind cluster $cluster"
    # --kubeconfig: kind removes the cluster's entry from that file (by default from
    # ~/.kube/config, which these scripts never use).
    "$kind" delete cluster --name "$cluster" --kubeconfig "$default_kubeconfig" >&2
  else
    klog "no kind cluster $cluster"
  fi
  rm -f "$default_kubeconfig"
  if [ "${KEEP_ENGINE:-}" = 1 ]; then
    klog "KEEP_ENGINE=1: the engine keeps running"
  else
    engine_down
  fi
}

cmd_load() {
  [ $# -gt 0 ] || usage
  engine_up
  KIND_BIN=$(kind_bin)
  cluster_exists || kdie "no kind cluster $cluster (hack/kind/cluster.sh up)"
  "$KIND_BIN" load docker-image --name "$cluster" "$@" >&2
}

cmd_kubeconfig() {
  local kc=${1:-$default_kubeconfig}
  engine_up
  KIND_BIN=$(kind_bin)
  cluster_exists || kdie "no kind cluster $cluster"
  write_kubeconfig "$kc"
  echo "$kc"
}

cmd_env() {
  if [ -S "$PRIVATE_SOCK" ] && DOCKER_HOST="unix://$PRIVATE_SOCK" docker info >/dev/null 2>&1; then
    echo "export DOCKER_HOST=unix://$PRIVATE_SOCK"
  else
    klog "the private engine is not running"
  fi
}

[ $# -gt 0 ] || usage
sub=$1; shift
case "$sub" in
  up) cmd_up "$@" ;;
  down) cmd_down ;;
  load) cmd_load "$@" ;;
  kubeconfig) cmd_kubeconfig "$@" ;;
  env) cmd_env ;;
  -h|--help|help) usage ;;
  *) usage ;;
esac
