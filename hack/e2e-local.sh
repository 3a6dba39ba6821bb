#!/usr/bin/env bash
# `make e2e`, the provider CI uses: runs hack/e2e-suite.sh against a local control plane
# (etcd + kube-apiserver, hack/control-plane.sh) with the chart installed by helm. There
# is no kubelet, so the DaemonSet's pods never run; instead one agent process per node
# runs here, with a token of the chart's ServiceAccount, so the chart's RBAC is all the
# agents have. Everything it starts is stopped and uninstalled on exit.
#
# Environment:
#   E2E_KUBECONFIG   use this cluster instead of starting a control plane (an admin
#                    kubeconfig; the agents still run here, so use node names no real
#                    agent serves)
#   E2E_NODES        node names, one agent each (default "e2e-node-a e2e-node-b")
#   E2E_PORT_RANGE   the agents' port range, the same on every node (default 23000-23999)
#   E2E_TIMEOUT      passed to the suite: seconds to wait for any one thing (default 60)
#   HELM, KUBECTL    tool paths (default: built or reused by hack/build-tools.sh)
#
# Both agents run on this host and probe the same ports. That is correct: each node's
# table is its own (ports are unique per node, not per cluster), and a probe binds a port
# only for an instant, so the two agents may well hand out the same numbers.
set -Eeuo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"

read -r -a nodes <<<"${E2E_NODES:-e2e-node-a e2e-node-b}"
range=${E2E_PORT_RANGE:-23000-23999}
NAMESPACE=portassign-e2e
RELEASE=portassign-e2e
SA=portassign-e2e # the chart's full name: the release name contains the chart name
started=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/portassign-e2e-local.XXXXXX")

STEPS=(a b c d e f g)
TITLE=(
  [a]="cargo build; kubectl-portassign plugin on PATH"
  [b]="control plane: ${E2E_KUBECONFIG:-local etcd + kube-apiserver}"
  [c]="helm install the chart (release $RELEASE, namespace $NAMESPACE)"
  [d]="one agent per node (${nodes[*]}) with the chart's ServiceAccount token; /readyz"
  [e]="the e2e suite (hack/e2e-suite.sh)"
  [f]="agents still running, no API refusals in their logs, every port released"
  [g]="cleanup: agents stopped, release uninstalled, $([ -n "${E2E_KUBECONFIG:-}" ] && echo "control plane left running" || echo "control plane stopped")"
)

declare -A agent_pid=() agent_log=()
on_poll() {
  local node
  for node in "${!agent_pid[@]}"; do
    kill -0 "${agent_pid[$node]}" 2>/dev/null && continue
    echo "--- last lines of the log of the agent for $node:" >&2
    tail -n 30 "${agent_log[$node]}" >&2 || true
    unset "agent_pid[$node]"
    die "the agent for $node exited"
  done
}

cp_dir=""
installed=""
cleanup() {
  local rc=$?
  trap - ERR
  set +e
  mark_failed "$rc"
  current=g
  printf '\n=== g. %s\n' "${TITLE[g]}"
  local clean=PASS node
  for node in "${!agent_pid[@]}"; do
    if stop_process "${agent_pid[$node]}"; then
      log "agent for $node (pid ${agent_pid[$node]}) stopped on SIGTERM"
    else
      clean=FAIL; log "the agent for $node ignored SIGTERM for 5s: killed"
    fi
  done
  if [ -n "$installed" ]; then
    "$HELM" uninstall "$RELEASE" -n "$NAMESPACE" >/dev/null 2>&1 || clean=FAIL
    log "uninstalled release $RELEASE"
  fi
  if [ -n "$cp_dir" ]; then
    hack/control-plane.sh down "$cp_dir" || clean=FAIL
    log "control plane stopped"
  fi
  if [ "$rc" -ne 0 ] && [ "${#agent_log[@]}" -gt 0 ]; then
    local keep="${TMPDIR:-/tmp}/portassign-e2e-logs"
    rm -rf "$keep"; mkdir -p "$keep"
    cp "${agent_log[@]}" "$keep/" 2>/dev/null && log "agent logs kept in $keep"
  fi
  rm -rf "$work"
  RESULT[g]=$clean
  printf -- '--- g. %s\n' "$clean"
  print_summary "$started" || exit 1
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------
step a
[ "${#nodes[@]}" -ge 2 ] || die "E2E_NODES must name at least 2 nodes (per-node uniqueness is tested across nodes)"
command -v curl >/dev/null || die "curl is needed to read the agents' /readyz"
build_plugin "$work"
pass

# ---------------------------------------------------------------------------------------
step b
resolve_tools helm kubectl
if [ -n "${E2E_KUBECONFIG:-}" ]; then
  export KUBECONFIG=$E2E_KUBECONFIG
else
  cp_dir=$work/control-plane
  export KUBECONFIG
  # The watchdog stops the control plane even if this script is killed outright.
  KUBECONFIG=$(PORTASSIGN_OWNER_PID=$$ hack/control-plane.sh up "$cp_dir") || die "the control plane did not start"
fi
"$KUBECTL" get --raw /readyz >/dev/null 2>&1 || die "the API server of $KUBECONFIG is not reachable or not ready"
log "KUBECONFIG=$KUBECONFIG (Kubernetes $("$KUBECTL" get --raw /version | sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p'))"
pass

# ---------------------------------------------------------------------------------------
step c
if "$HELM" status "$RELEASE" -n "$NAMESPACE" >/dev/null 2>&1; then
  die "release $RELEASE already exists in $NAMESPACE (left by an earlier run?): helm uninstall $RELEASE -n $NAMESPACE"
fi
if "$KUBECTL" get crd portassignments.portassign.io >/dev/null 2>&1; then
  # helm installs a chart's CRDs only when absent; bring an existing one up to date.
  "$KUBECTL" apply --server-side --force-conflicts -f charts/portassign/crds/ >/dev/null
  log "existing CRD updated from charts/portassign/crds/"
fi
# No --wait: without a kubelet the DaemonSet's pods never start.
"$HELM" install "$RELEASE" charts/portassign -n "$NAMESPACE" --create-namespace \
  --set portRange.first="${range%-*}" --set portRange.last="${range#*-}" >/dev/null ||
  die "helm install failed"
installed=1
"$KUBECTL" wait --for=condition=Established crd/portassignments.portassign.io --timeout=30s >/dev/null
"$KUBECTL" get "serviceaccount/$SA" "daemonset/$RELEASE" -n "$NAMESPACE" >/dev/null ||
  die "the chart did not create ServiceAccount/DaemonSet $RELEASE in $NAMESPACE"
log "release $RELEASE installed: $("$HELM" status "$RELEASE" -n "$NAMESPACE" | sed -n 's/^STATUS: //p')"
pass

# ---------------------------------------------------------------------------------------
step d
sa_kubeconfig "$NAMESPACE" "$SA" "$work/agent.kubeconfig"
log "agents authenticate as system:serviceaccount:$NAMESPACE:$SA"
for node in "${nodes[@]}"; do
  agent_log[$node]=$work/agent-$node.log
  start_agent "$work/agent.kubeconfig" "$node" "$range" "e2e-agent-$node" "${agent_log[$node]}"
  agent_pid[$node]=$AGENT_PID
done
for node in "${nodes[@]}"; do
  wait_until 30 "the agent for $node is ready (/readyz)" agent_ready "${agent_log[$node]}"
  log "agent for $node: pid ${agent_pid[$node]}, http://$(agent_http "${agent_log[$node]}"), ports $range"
done
pass

# ---------------------------------------------------------------------------------------
step e
if ! E2E_NODES="${nodes[*]}" E2E_PORT_RANGE=$range KUBECTL=$KUBECTL hack/e2e-suite.sh 2>&1 | sed -u 's/^/  | /'; then
  die "the e2e suite failed (above)"
fi
pass

# ---------------------------------------------------------------------------------------
step f
on_poll
for node in "${nodes[@]}"; do
  if grep -Ei 'forbidden|panicked' "${agent_log[$node]}"; then
    die "the log of the agent for $node has the lines above: an RBAC refusal or a panic"
  fi
  table=$(curl -fsS --max-time 5 "http://$(agent_http "${agent_log[$node]}")/debug/table") ||
    die "could not read the /debug/table of the agent for $node"
  without=${table//\"port\":/}
  held=$(((${#table} - ${#without}) / 7)) # 7 = length of "port":
  [ "$held" -eq 0 ] || die "the agent for $node still holds $held ports after every object was deleted: $table"
  log "agent for $node: running, $(wc -l <"${agent_log[$node]}") log lines without a refusal, its table empty"
done
pass
