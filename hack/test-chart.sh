#!/usr/bin/env bash
# Tests the Helm chart in charts/portassign against a real Kubernetes API server:
# lint, render and server-side dry-run, values the chart must reject, install, a real
# agent running with the chart's ServiceAccount token (proves the RBAC suffices),
# `kubectl auth can-i` (proves it grants nothing more), upgrade and uninstall.
#
# Usage:
#   KUBECONFIG=$(hack/control-plane.sh up /tmp/pa-chart) hack/test-chart.sh
#
# Environment:
#   KUBECONFIG       required: an admin kubeconfig of a running cluster (the local
#                    control plane is enough; no kubelet is needed, pods never start)
#   HELM, KUBECTL    tool paths (default: built or reused by hack/build-tools.sh)
#   PORTASSIGN_BIN   the agent binary (default: target/debug/portassign)
#   CHART_TEST_NAMESPACE  release namespace (default: portassign-system)
#
# The CRD is applied (server-side) and left installed, like `helm uninstall` leaves it.
# The release namespace is left too: without a controller-manager a deleted namespace
# stays Terminating and would block the next run.
set -Eeuo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"

: "${KUBECONFIG:?set KUBECONFIG to the admin kubeconfig of a running cluster, e.g. KUBECONFIG=\$(hack/control-plane.sh up /tmp/pa-chart)}"
export KUBECONFIG
resolve_tools helm kubectl
NAMESPACE=${CHART_TEST_NAMESPACE:-portassign-system}

CHART=charts/portassign
RELEASE=portassign
# Names the chart gives the release's resources (fullname = release name here).
FULLNAME=portassign
SA=portassign
AGENT_NODE=rbac-node
AGENT_RANGE_FIRST=21000
AGENT_RANGE_LAST=21099
CRD=portassignments.portassign.io

work=$(mktemp -d "${TMPDIR:-/tmp}/portassign-chart-test.XXXXXX")
started=$(date +%s)

# ---------------------------------------------------------------------------------------
# Reporting (hack/lib.sh): every step is PASS, FAIL or NOT RUN in the summary printed on exit.

STEPS=(a b c d e f g j h i)
TITLE=(
  [a]="chart CRD is byte-identical to crds/portassignment.yaml"
  [b]="helm lint --strict (default + ci/ values)"
  [c]="helm template | kubectl apply --dry-run=server (default + ci/ values, examples)"
  [d]="invalid values are rejected with a clear message"
  [e]="helm install; release deployed, DaemonSet/ServiceAccount/RBAC as specified"
  [f]="agent with the chart's ServiceAccount token assigns, grows, shrinks, releases"
  [g]="kubectl auth can-i: exactly the needed permissions"
  [j]="janitor with its ServiceAccount token: takes the Lease; can-i exactly its calls"
  [h]="helm upgrade changes the DaemonSet; helm uninstall removes it, keeps the CRD"
  [i]="cleanup: agent stopped, test objects removed"
)

agent_pid=""
agent_log=$work/agent.log
janitor_pid=""
on_die() {
  if [ -s "$agent_log" ] && grep -qi forbidden "$agent_log"; then
    echo "    the agent was refused by the API server (missing RBAC?):" >&2
    grep -i -m 5 forbidden "$agent_log" | cut -c 1-400 | sed 's/^/      /' >&2
  fi
}
on_poll() { agent_alive_or_die; }
agent_alive_or_die() {
  if [ -n "$agent_pid" ] && ! kill -0 "$agent_pid" 2>/dev/null; then
    agent_pid=""
    echo "--- last lines of the agent log ($agent_log):" >&2
    tail -n 30 "$agent_log" >&2 || true
    die "the agent exited unexpectedly"
  fi
}

# ---------------------------------------------------------------------------------------
# Cleanup on every exit, then the summary.

installed=""
stub_crd_created=""
test_ns=""
cleanup() {
  local rc=$?
  trap - ERR
  set +e
  mark_failed "$rc"
  current=i
  printf '\n=== i. %s\n' "${TITLE[i]}"
  local clean=PASS
  if [ -n "$test_ns" ]; then
    # Delete the test object while the agent still runs so its finalizer is removed;
    # if that does not happen, drop the finalizer so the namespace can go.
    if "$KUBECTL" get portassignment rbac-check -n "$test_ns" >/dev/null 2>&1; then
      "$KUBECTL" delete portassignment rbac-check -n "$test_ns" --timeout=20s >/dev/null 2>&1 ||
        "$KUBECTL" patch portassignment rbac-check -n "$test_ns" --type=merge \
          -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1
    fi
    "$KUBECTL" delete namespace "$test_ns" --wait=false >/dev/null 2>&1 || clean=FAIL
    log "deleted namespace $test_ns"
  fi
  if [ -n "$agent_pid" ]; then
    if stop_process "$agent_pid"; then
      log "agent (pid $agent_pid) stopped on SIGTERM"
    else
      clean=FAIL; log "the agent ignored SIGTERM for 5s: killed"
    fi
  fi
  if [ -n "$janitor_pid" ]; then
    stop_process "$janitor_pid" || clean=FAIL
    log "janitor (pid $janitor_pid) stopped"
  fi
  if [ -n "$installed" ]; then
    "$HELM" uninstall "$RELEASE" -n "$NAMESPACE" >/dev/null 2>&1 || clean=FAIL
    log "uninstalled release $RELEASE"
  fi
  if [ -n "$stub_crd_created" ]; then
    "$KUBECTL" delete crd servicemonitors.monitoring.coreos.com >/dev/null 2>&1 || clean=FAIL
    log "deleted the stub ServiceMonitor CRD"
  fi
  if [ "$rc" -ne 0 ] && [ -s "$agent_log" ]; then
    cp "$agent_log" "${TMPDIR:-/tmp}/portassign-chart-test-agent.log" 2>/dev/null &&
      log "agent log kept at ${TMPDIR:-/tmp}/portassign-chart-test-agent.log"
  fi
  rm -rf "$work"
  RESULT[i]=$clean
  printf -- '--- i. %s\n' "$clean"
  print_summary "$started" || exit 1
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------
# Preconditions.

for tool in "$HELM" "$KUBECTL" "$PORTASSIGN_BIN"; do
  [ -x "$tool" ] || die "$tool is not an executable (set HELM, KUBECTL, PORTASSIGN_BIN; build the agent with cargo build)"
done
command -v curl >/dev/null || die "curl is needed to read the agent's /readyz and /debug/table"
"$KUBECTL" get --raw /readyz >/dev/null 2>&1 ||
  die "the API server of $KUBECONFIG is not reachable or not ready"
kube_version=$("$KUBECTL" get --raw /version | sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p')
[ -n "$kube_version" ] || die "could not read the API server's version from /version"
echo "cluster: Kubernetes $kube_version, helm: $("$HELM" version --short), namespace: $NAMESPACE"
# Rendering uses the cluster's version: the chart requires >= 1.32 (CRD selectableFields).
render=("$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --kube-version "$kube_version")

# ---------------------------------------------------------------------------------------
step a
diff -u crds/portassignment.yaml "$CHART/crds/portassignment.yaml" ||
  die "$CHART/crds/portassignment.yaml differs from crds/portassignment.yaml: cp crds/portassignment.yaml $CHART/crds/"
log "identical"
pass

# ---------------------------------------------------------------------------------------
step b
value_sets=("")
for f in "$CHART"/ci/*.yaml; do value_sets+=("$f"); done
[ "${#value_sets[@]}" -ge 3 ] || die "expected at least two values files in $CHART/ci/"
for values in "${value_sets[@]}"; do
  args=(--strict --kube-version "$kube_version")
  [ -n "$values" ] && args+=(--values "$values")
  out=$("$HELM" lint "$CHART" "${args[@]}" 2>&1) || { echo "$out"; die "helm lint --strict failed for ${values:-default values}"; }
  log "lint ok: ${values:-default values}"
done
pass

# ---------------------------------------------------------------------------------------
step c
"$KUBECTL" apply --server-side -f crds/ >/dev/null
"$KUBECTL" wait --for=condition=Established "crd/$CRD" --timeout=30s >/dev/null
log "CRD $CRD applied and established"
# The ServiceMonitor values set needs the Prometheus Operator's kind to exist; a stub CRD
# (any fields) is enough for the dry-run to check the object's envelope and namespace.
if ! "$KUBECTL" get crd servicemonitors.monitoring.coreos.com >/dev/null 2>&1; then
  "$KUBECTL" apply -f - >/dev/null <<'YAML'
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: servicemonitors.monitoring.coreos.com
  annotations:
    portassign.io/note: stub created by hack/test-chart.sh for a server-side dry-run
spec:
  group: monitoring.coreos.com
  names: {kind: ServiceMonitor, listKind: ServiceMonitorList, plural: servicemonitors, singular: servicemonitor}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
YAML
  stub_crd_created=1
  "$KUBECTL" wait --for=condition=Established crd/servicemonitors.monitoring.coreos.com --timeout=30s >/dev/null
  log "stub ServiceMonitor CRD created (deleted on exit)"
fi
phase=$("$KUBECTL" get namespace "$NAMESPACE" -o jsonpath='{.status.phase}' 2>/dev/null || true)
case "$phase" in
  Active) ;;
  "") "$KUBECTL" create namespace "$NAMESPACE" >/dev/null; log "created namespace $NAMESPACE" ;;
  *) die "namespace $NAMESPACE is $phase; set CHART_TEST_NAMESPACE to another name" ;;
esac
for values in "${value_sets[@]}"; do
  args=()
  [ -n "$values" ] && args+=(--values "$values")
  manifest=$work/rendered.yaml
  "${render[@]}" "${args[@]}" >"$manifest" || die "helm template failed for ${values:-default values}"
  out=$("$KUBECTL" apply --dry-run=server -f "$manifest" 2>&1) ||
    { echo "$out"; die "the API server rejected the chart rendered with ${values:-default values}"; }
  log "server dry-run ok: ${values:-default values}: $(grep -c '^kind:' "$manifest") objects"
done
for example in examples/*.yaml; do
  out=$(sed "s/NODE_NAME/dry-run-node/" "$example" |
    "$KUBECTL" apply --dry-run=server -n "$NAMESPACE" -f - 2>&1) ||
    { echo "$out"; die "the API server rejected $example"; }
  log "server dry-run ok: $example"
done
pass

# ---------------------------------------------------------------------------------------
step d
# expect_rejected NAME PATTERN [helm template args...] < values: rendering must fail and
# say PATTERN (so a failure for an unrelated reason does not count).
expect_rejected() {
  local name=$1 pattern=$2; shift 2
  local values=$work/invalid.yaml out
  cat >"$values"
  if out=$("${render[@]}" --values "$values" "$@" 2>&1); then
    die "values '$name' were accepted; the chart must reject them"
  fi
  grep -qE -- "$pattern" <<<"$out" ||
    { echo "$out"; die "values '$name' were rejected, but not with a message matching /$pattern/"; }
  log "rejected: $name"
  sed -n "/^Error:\|^- at /s/^/        /p" <<<"$out"
}
expect_rejected "unknown top-level key" "additional properties 'portRnage' not allowed" <<'YAML'
portRnage: {first: 20000, last: 20999}
YAML
expect_rejected "unknown nested key" "at '/image': additional properties 'repo' not allowed" <<'YAML'
image: {repo: example/portassign}
YAML
expect_rejected "first > last" 'portRange.first \(25000\) is above portRange.last \(24000\)' <<'YAML'
portRange: {first: 25000, last: 24000}
YAML
expect_rejected "range below 1024 without allowPrivilegedPorts (schema)" "at '/portRange/first': minimum" <<'YAML'
portRange: {first: 80, last: 1000}
YAML
expect_rejected "range below 1024 without allowPrivilegedPorts (template, schema skipped)" \
  'portRange.first \(80\) is a privileged port' --skip-schema-validation <<'YAML'
portRange: {first: 80, last: 1000}
YAML
expect_rejected "metricsPort below 1024 without allowPrivilegedPorts" "at '/metricsPort': minimum" <<'YAML'
metricsPort: 443
YAML
expect_rejected "metricsPort inside the port range" 'metricsPort \(25000\) lies inside portRange 20000-29999' <<'YAML'
metricsPort: 25000
YAML
expect_rejected "metricsPort inside a privileged range" 'metricsPort \(900\) lies inside portRange 800-999' <<'YAML'
allowPrivilegedPorts: true
portRange: {first: 800, last: 999}
metricsPort: 900
YAML
expect_rejected "bad logFormat" "at '/logFormat': value must be one of" <<'YAML'
logFormat: text
YAML
expect_rejected "port above 65535" "at '/portRange/last': maximum" <<'YAML'
portRange: {first: 20000, last: 70000}
YAML
expect_rejected "port given as a string" "at '/portRange/first': got string, want integer" <<'YAML'
portRange: {first: "20000", last: 29999}
YAML
expect_rejected "concurrency 0" "at '/concurrency': minimum" <<'YAML'
concurrency: 0
YAML
expect_rejected "existing ServiceAccount without a name" 'serviceAccount.name must name an existing ServiceAccount' <<'YAML'
serviceAccount: {create: false}
YAML
pass

# ---------------------------------------------------------------------------------------
step e
if "$HELM" status "$RELEASE" -n "$NAMESPACE" >/dev/null 2>&1; then
  die "release $RELEASE already exists in $NAMESPACE (left by an earlier run?): helm uninstall $RELEASE -n $NAMESPACE"
fi
# No --wait: this cluster may have no kubelet, so the agent pods never run.
"$HELM" install "$RELEASE" "$CHART" -n "$NAMESPACE" --create-namespace >"$work/install.txt" ||
  die "helm install failed"
installed=1
release_deployed() {
  local status
  status=$("$HELM" status "$RELEASE" -n "$NAMESPACE") && grep -qx 'STATUS: deployed' <<<"$status"
}
wait_until 60 "release $RELEASE is deployed" release_deployed
log "release $RELEASE deployed; NOTES.txt starts with: $(sed -n '/^NOTES:/{n;p;q}' "$work/install.txt")"
"$KUBECTL" get "daemonset/$FULLNAME" "serviceaccount/$SA" -n "$NAMESPACE" >/dev/null ||
  die "the DaemonSet or the ServiceAccount is missing"
"$KUBECTL" get "clusterrole/$FULLNAME" "clusterrolebinding/$FULLNAME" >/dev/null ||
  die "the ClusterRole or ClusterRoleBinding is missing"
# expect_jsonpath KIND/NAME NAMESPACE JSONPATH WANT
expect_jsonpath() {
  local got
  got=$("$KUBECTL" get "$1" ${2:+-n "$2"} -o jsonpath="$3")
  [ "$got" = "$4" ] || die "$1 $3: want '$4', got '$got'"
}
ds=daemonset/$FULLNAME
pod=.spec.template.spec
expect_jsonpath "$ds" "$NAMESPACE" "{$pod.hostNetwork}" true
expect_jsonpath "$ds" "$NAMESPACE" "{$pod.dnsPolicy}" ClusterFirstWithHostNet
expect_jsonpath "$ds" "$NAMESPACE" "{$pod.serviceAccountName}" "$SA"
expect_jsonpath "$ds" "$NAMESPACE" "{$pod.securityContext.runAsNonRoot} {$pod.securityContext.runAsUser} {$pod.securityContext.seccompProfile.type}" \
  "true 65532 RuntimeDefault"
expect_jsonpath "$ds" "$NAMESPACE" "{$pod.containers[0].securityContext}" \
  '{"allowPrivilegeEscalation":false,"capabilities":{"drop":["ALL"]},"privileged":false,"readOnlyRootFilesystem":true}'
expect_jsonpath "$ds" "$NAMESPACE" "{$pod.containers[0].args}" \
  '["agent","--port-range=20000-29999","--concurrency=256","--listen=0.0.0.0:9477","--log-format=json"]'
expect_jsonpath "$ds" "$NAMESPACE" "{range $pod.containers[0].env[*]}{.name}={.valueFrom.fieldRef.fieldPath} {end}" \
  "NODE_NAME=spec.nodeName POD_NAME=metadata.name "
expect_jsonpath "$ds" "$NAMESPACE" "{$pod.containers[0].ports[0].name}:{$pod.containers[0].ports[0].containerPort}" "metrics:9477"
expect_jsonpath "$ds" "$NAMESPACE" "{$pod.containers[0].livenessProbe.httpGet.path} {$pod.containers[0].readinessProbe.httpGet.path}" \
  "/healthz /readyz"
expect_jsonpath "$ds" "$NAMESPACE" "{.spec.updateStrategy.type} {.spec.updateStrategy.rollingUpdate.maxUnavailable}" "RollingUpdate 1"
expect_jsonpath "$ds" "$NAMESPACE" "{$pod.tolerations}" '[{"operator":"Exists"}]'
log "DaemonSet: hostNetwork, downward-API env, probes, hardened securityContext, tolerate-all as specified"
expect_jsonpath "clusterrole/$FULLNAME" "" '{range .rules[*]}{.apiGroups} {.resources} {.verbs};{end}' \
  '["portassign.io"] ["portassignments"] ["list","watch","patch"];["portassign.io"] ["portassignments/status"] ["patch"];["events.k8s.io"] ["events"] ["create","patch"];'
expect_jsonpath "clusterrolebinding/$FULLNAME" "" '{.subjects[0].kind}/{.subjects[0].namespace}/{.subjects[0].name} -> {.roleRef.name}' \
  "ServiceAccount/$NAMESPACE/$SA -> $FULLNAME"
log "ClusterRole rules are exactly the agent's calls; bound to $NAMESPACE/$SA"
pass

# ---------------------------------------------------------------------------------------
step f
agent_kubeconfig=$work/agent.kubeconfig
sa_kubeconfig "$NAMESPACE" "$SA" "$agent_kubeconfig"
log "kubeconfig for system:serviceaccount:$NAMESPACE:$SA written"

start_agent "$agent_kubeconfig" "$AGENT_NODE" "$AGENT_RANGE_FIRST-$AGENT_RANGE_LAST" chart-test-agent "$agent_log"
agent_pid=$AGENT_PID
wait_until 30 "the agent logs its HTTP address" agent_http "$agent_log"
http=$(agent_http "$agent_log")
# /readyz turns 200 once the table is rebuilt, which needs the cluster-wide list.
wait_until 30 "the agent is ready (table rebuilt from a cluster-wide list)" agent_ready "$agent_log"
log "agent (pid $agent_pid) ready on http://$http"

test_ns=chart-rbac-$(date +%s)-$$
"$KUBECTL" create namespace "$test_ns" >/dev/null
# apply_keys KEY...: (re)applies the test object with these keys.
apply_keys() {
  local keys
  keys=$(printf '"%s",' "$@")
  "$KUBECTL" apply -f - >/dev/null <<YAML
apiVersion: portassign.io/v1alpha1
kind: PortAssignment
metadata: {name: rbac-check, namespace: $test_ns}
spec: {nodeName: $AGENT_NODE, protocol: TCP, keys: [${keys%,}]}
YAML
}
pa() { "$KUBECTL" get portassignment rbac-check -n "$test_ns" "$@"; }
# settled N: the agent has observed the latest generation, N keys hold ports, Ready=True.
settled() {
  local want=$1 got
  got=$(pa -o jsonpath='{.metadata.generation}={.status.observedGeneration} {.status.keyCount}/{.status.assignedCount} {.status.conditions[?(@.type=="Ready")].status}')
  local generation=${got%%=*} rest=${got#*=}
  [ "$rest" = "$generation $want/$want True" ]
}
# port_map: "key=port" lines, sorted by key.
port_map() { pa -o jsonpath='{range .status.ports[*]}{.key}={.port}{"\n"}{end}' | sort; }
# check_ports KEY...: the status holds exactly these keys, with distinct ports in the range.
check_ports() {
  local map keys ports
  map=$(port_map)
  keys=$(cut -d= -f1 <<<"$map" | tr '\n' ' ')
  [ "$keys" = "$(printf '%s\n' "$@" | sort | tr '\n' ' ')" ] || die "status keys are '$keys', want '$*'"
  ports=$(cut -d= -f2 <<<"$map")
  [ "$(sort -u <<<"$ports" | wc -l)" -eq "$#" ] || die "ports are not distinct: $(tr '\n' ' ' <<<"$map")"
  local p
  for p in $ports; do
    if [ "$p" -lt "$AGENT_RANGE_FIRST" ] || [ "$p" -gt "$AGENT_RANGE_LAST" ]; then
      die "port $p is outside the agent's range $AGENT_RANGE_FIRST-$AGENT_RANGE_LAST"
    fi
  done
}
# keeps OLD_MAP: every key=port line of OLD_MAP whose key is still listed is unchanged.
keeps() {
  local now line
  now=$(port_map)
  while read -r line; do
    [ -n "$line" ] || continue
    if grep -q "^${line%%=*}=" <<<"$now"; then
      grep -qx -- "$line" <<<"$now" || die "key ${line%%=*} changed port: was ${line#*=}, now $(grep "^${line%%=*}=" <<<"$now")"
    fi
  done <<<"$1"
}

apply_keys k-1 k-2 k-3
wait_until 60 "3 keys hold ports and Ready=True" settled 3
check_ports k-1 k-2 k-3
three=$(port_map)
log "3 keys: $(tr '\n' ' ' <<<"$three")"
finalizers=$(pa -o jsonpath='{.metadata.finalizers}')
grep -q 'portassign.io/release-ports' <<<"$finalizers" || die "the agent did not add its finalizer (finalizers: $finalizers)"
log "finalizer portassign.io/release-ports added"

apply_keys k-1 k-2 k-3 k-4 k-5
wait_until 60 "5 keys hold ports and Ready=True" settled 5
check_ports k-1 k-2 k-3 k-4 k-5
keeps "$three"
five=$(port_map)
log "5 keys, the first 3 unchanged: $(tr '\n' ' ' <<<"$five")"

apply_keys k-2 k-4
wait_until 60 "2 keys hold ports and Ready=True" settled 2
check_ports k-2 k-4
keeps "$five"
log "2 keys, unchanged: $(port_map | tr '\n' ' ')"
table_holds() {
  local table
  table=$(curl -fsS "http://$http/debug/table") || return 1
  local without=${table//\"port\":/}
  [ $(((${#table} - ${#without}) / 7)) -eq "$1" ]  # 7 = length of "port":
}
wait_until 10 "the agent's table holds 2 ports after the shrink" table_holds 2

event_reasons() {
  "$KUBECTL" get events.events.k8s.io -n "$test_ns" \
    -o jsonpath='{range .items[*]}{.reportingController}/{.reason}{"\n"}{end}'
}
has_events() {
  local reasons
  reasons=$(event_reasons) &&
    grep -qx 'portassign-agent/Assigned' <<<"$reasons" && grep -qx 'portassign-agent/Released' <<<"$reasons"
}
wait_until 30 "events Assigned and Released are recorded (events.k8s.io)" has_events
log "events recorded: $(event_reasons | sort -u | tr '\n' ' ')"

"$KUBECTL" delete portassignment rbac-check -n "$test_ns" --wait=false >/dev/null
gone() {
  local out
  if out=$(pa -o name 2>&1); then return 1; fi
  grep -q NotFound <<<"$out"
}
wait_until 60 "the deleted object is gone (finalizer removed)" gone
wait_until 10 "the agent's table is empty" table_holds 0
log "object deleted, finalizer removed, all its ports released"

agent_alive_or_die
if grep -i forbidden "$agent_log"; then
  die "the agent's log has 'forbidden' lines (above): the ClusterRole lacks a permission"
fi
log "no 'forbidden' in the agent log ($(wc -l <"$agent_log") lines)"
pass

# ---------------------------------------------------------------------------------------
step g
as_sa=(--as="system:serviceaccount:$NAMESPACE:$SA" --as-group=system:serviceaccounts
  --as-group="system:serviceaccounts:$NAMESPACE" --as-group=system:authenticated)
# can VERB RESOURCE [ARGS...] / cannot VERB RESOURCE [ARGS...]
can() {
  local out
  out=$("$KUBECTL" auth can-i "$@" "${as_sa[@]}" 2>&1) || die "the ServiceAccount cannot '$*' ($out); the agent needs it"
  log "can    $*"
}
cannot() {
  local out
  if out=$("$KUBECTL" auth can-i "$@" "${as_sa[@]}" 2>&1); then
    die "the ServiceAccount can '$*' ($out); least privilege says it must not"
  fi
  [ "$(tail -n1 <<<"$out")" = no ] || die "kubectl auth can-i $* failed: $out"
  log "cannot $*"
}
for verb in list watch patch; do can "$verb" portassignments.portassign.io --all-namespaces; done
can patch portassignments.portassign.io --subresource=status --all-namespaces
can create events.events.k8s.io -n "$test_ns"
can patch events.events.k8s.io -n "$test_ns"
for verb in get create update delete deletecollection; do cannot "$verb" portassignments.portassign.io --all-namespaces; done
cannot update portassignments.portassign.io --subresource=status --all-namespaces
cannot get secrets --all-namespaces
cannot list secrets -n "$NAMESPACE"
cannot update configmaps -n "$NAMESPACE"
cannot create pods -n "$NAMESPACE"
cannot list nodes
cannot get nodes
cannot delete events.events.k8s.io -n "$test_ns"
cannot create serviceaccounts --subresource=token -n "$NAMESPACE"
cannot create clusterrolebindings.rbac.authorization.k8s.io
cannot escalate clusterroles.rbac.authorization.k8s.io
cannot update customresourcedefinitions.apiextensions.k8s.io
cannot impersonate users
cannot '*' '*' --all-namespaces
pass

# ---------------------------------------------------------------------------------------
step j
JANITOR=$FULLNAME-janitor
"$KUBECTL" get "deployment/$JANITOR" "serviceaccount/$JANITOR" "role/$JANITOR" "rolebinding/$JANITOR" -n "$NAMESPACE" >/dev/null ||
  die "the janitor's Deployment, ServiceAccount, Role or RoleBinding is missing"
"$KUBECTL" get "clusterrole/$JANITOR" "clusterrolebinding/$JANITOR" >/dev/null || die "the janitor's ClusterRole is missing"
expect_jsonpath "deployment/$JANITOR" "$NAMESPACE" '{.spec.template.spec.containers[0].args}' \
  '["janitor","--grace=300","--interval=30","--log-format=json"]'
janitor_kubeconfig=$work/janitor.kubeconfig
sa_kubeconfig "$NAMESPACE" "$JANITOR" "$janitor_kubeconfig"
# A grace period of an hour: it takes the Lease and lists nodes and objects, but releases
# nothing (the shared test cluster has objects of nodes that do not exist).
janitor_log=$work/janitor.log
KUBECONFIG=$janitor_kubeconfig RUST_LOG=info "$PORTASSIGN_BIN" janitor --grace 3600 --interval 1 \
  --lease-namespace "$NAMESPACE" --pod-name chart-test-janitor >"$janitor_log" 2>&1 &
janitor_pid=$!
lease_holder() { "$KUBECTL" get lease portassign-janitor -n "$NAMESPACE" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null; }
held_by_test() { [ "$(lease_holder)" = chart-test-janitor ]; }
wait_until 30 "the janitor holds its Lease" held_by_test
sleep 2  # a few sweeps: nodes and PortAssignments listed with its own credentials
if grep -iE "forbidden|failed" "$janitor_log"; then
  die "the janitor's log has refusals (above): its RBAC lacks a permission"
fi
stop_process "$janitor_pid" || die "the janitor ignored SIGTERM"
janitor_pid=""
log "the janitor took the Lease and swept with its ServiceAccount's token; no refusals"
as_janitor=(--as="system:serviceaccount:$NAMESPACE:$JANITOR" --as-group=system:serviceaccounts
  --as-group="system:serviceaccounts:$NAMESPACE" --as-group=system:authenticated)
jcan() { "$KUBECTL" auth can-i "$@" "${as_janitor[@]}" >/dev/null 2>&1 || die "the janitor cannot '$*'; it needs it"; log "janitor can    $*"; }
jcannot() {
  if "$KUBECTL" auth can-i "$@" "${as_janitor[@]}" >/dev/null 2>&1; then die "the janitor can '$*'; it must not"; fi
  log "janitor cannot $*"
}
jcan list nodes
jcan list portassignments.portassign.io --all-namespaces
jcan patch portassignments.portassign.io --all-namespaces
jcan patch portassignments.portassign.io --subresource=status --all-namespaces
jcan create events.events.k8s.io -n "$NAMESPACE"
jcan create leases.coordination.k8s.io -n "$NAMESPACE"
jcan update leases.coordination.k8s.io/portassign-janitor -n "$NAMESPACE"
jcannot update leases.coordination.k8s.io/some-other-lease -n "$NAMESPACE"
jcannot create leases.coordination.k8s.io -n default
jcannot delete nodes
jcannot delete portassignments.portassign.io --all-namespaces
jcannot create portassignments.portassign.io --all-namespaces
jcannot get secrets --all-namespaces
jcannot create pods -n "$NAMESPACE"
pass

# ---------------------------------------------------------------------------------------
step h
revision() { "$HELM" status "$RELEASE" -n "$NAMESPACE" | sed -n 's/^REVISION: //p'; }
"$HELM" upgrade "$RELEASE" "$CHART" -n "$NAMESPACE" \
  --set concurrency=4 --set portRange.first=22000 --set portRange.last=22999 --set logFormat=human >/dev/null ||
  die "helm upgrade failed"
wait_until 60 "release $RELEASE is deployed" release_deployed
[ "$(revision)" = 2 ] || die "release revision is $(revision) after the upgrade, want 2"
expect_jsonpath "$ds" "$NAMESPACE" "{$pod.containers[0].args}" \
  '["agent","--port-range=22000-22999","--concurrency=4","--listen=0.0.0.0:9477","--log-format=human"]'
log "upgraded to revision 2: DaemonSet args carry the new range, concurrency and log format"
"$HELM" uninstall "$RELEASE" -n "$NAMESPACE" >/dev/null || die "helm uninstall failed"
installed=""
# removed NAMESPACE KIND/NAME...: every object is NotFound ("" for cluster-scoped ones).
removed() {
  local ns=$1 object out; shift
  for object in "$@"; do
    if out=$("$KUBECTL" get "$object" ${ns:+-n "$ns"} -o name 2>&1); then return 1; fi
    grep -q NotFound <<<"$out" || return 1
  done
}
wait_until 30 "the DaemonSet and ServiceAccount are deleted" removed "$NAMESPACE" "$ds" "serviceaccount/$SA"
wait_until 30 "the ClusterRole and ClusterRoleBinding are deleted" removed "" "clusterrole/$FULLNAME" "clusterrolebinding/$FULLNAME"
wait_until 30 "the janitor's resources are deleted" removed "$NAMESPACE" "deployment/$JANITOR" "role/$JANITOR"
wait_until 30 "the janitor's ClusterRole is deleted" removed "" "clusterrole/$JANITOR"
"$KUBECTL" get "crd/$CRD" >/dev/null || die "helm uninstall removed the CRD; it must keep it (and the objects in it)"
log "uninstalled: DaemonSet, ServiceAccount, ClusterRole, ClusterRoleBinding gone; CRD $CRD kept"
pass
