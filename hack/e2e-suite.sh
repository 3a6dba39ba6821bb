#!/usr/bin/env bash
# The end-to-end suite: what a user does with kubectl on a cluster where the chart is
# installed and an agent serves each node. It knows nothing of how the cluster or the
# agents were set up; the providers do that and then run it:
#   hack/e2e-local.sh  local control plane, agents as local processes (CI)
#   hack/e2e-kind.sh   kind cluster, agents as the chart's DaemonSet (needs Docker)
#
# In a fresh namespace: examples/pool.yaml for every node -> Ready, ports unique per
# node, `kubectl get pa` columns; lookups both ways with `kubectl portassign`; keys grown
# and shrunk with `kubectl patch` (ports that stay do not move); examples/udp.yaml and
# tcpudp.yaml -> Ready; `kubectl describe pa` shows the events; everything deleted and
# gone (the agents released it and removed their finalizers).
#
# Environment:
#   KUBECONFIG     required: a cluster with the chart (CRD) installed
#   E2E_NODES      required: space-separated names of the nodes running agents
#   KUBECTL        kubectl (default: kubectl on PATH); the plugin `kubectl-portassign`
#                  must be on PATH (a symlink to the portassign binary)
#   E2E_PORT_RANGE FIRST-LAST: the agents' range; when set, every port must lie in it
#   E2E_TIMEOUT    seconds to wait for any one thing (default 60)
#   E2E_NAMESPACE  namespace to create for the test objects (default e2e-<time>-<pid>)
# Needs jq (to read the plugin's JSON output). Exits non-zero unless every step passed.
set -Eeuo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"

: "${KUBECONFIG:?set KUBECONFIG to the kubeconfig of a cluster with the chart installed}"
: "${E2E_NODES:?set E2E_NODES to the space-separated names of the nodes where agents run}"
export KUBECONFIG
KUBECTL=${KUBECTL:-kubectl}
TIMEOUT=${E2E_TIMEOUT:-60}
NS=${E2E_NAMESPACE:-e2e-$(date +%s)-$$}
read -r -a NODES <<<"$E2E_NODES"
started=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/portassign-e2e.XXXXXX")

STEPS=(a b c d e f g h i)
TITLE=(
  [a]="preconditions: cluster, CRD, kubectl portassign plugin, jq"
  [b]="examples/pool.yaml on every node: Ready, ports unique per node, kubectl get pa columns"
  [c]="lookups: kubectl portassign key (-o json) and port --node (table, yaml); misses exit 1"
  [d]="grow keys (kubectl patch): Ready, ports that stay are unchanged"
  [e]="shrink keys (kubectl patch): Ready, ports that stay are unchanged, removed keys hold none"
  [f]="examples/udp.yaml and tcpudp.yaml: Ready, ports unique per node across protocols"
  [g]="kubectl describe pa shows the Assigned and Released events"
  [h]="delete everything: objects gone (finalizers removed), lookups find nothing"
  [i]="cleanup: test objects and namespace deleted"
)

# Every kubectl call is bounded: its own waits use TIMEOUT, this is a backstop.
if command -v timeout >/dev/null; then
  k() { timeout "$((TIMEOUT + 30))" "$KUBECTL" "$@"; }
else
  k() { "$KUBECTL" "$@"; }
fi
kn() { k -n "$NS" "$@"; }

ns_created=""
cleanup() {
  local rc=$?
  trap - ERR
  set +e
  mark_failed "$rc"
  current=i
  printf '\n=== i. %s\n' "${TITLE[i]}"
  local clean=PASS left
  if [ -n "$ns_created" ]; then
    left=$(kn get pa -o name 2>/dev/null)
    if [ -n "$left" ]; then
      # Deleted while the agents run, the objects go once their ports are released.
      kn delete pa --all --wait=false >/dev/null 2>&1
      if ! kn wait --for=delete pa --all --timeout=20s >/dev/null 2>&1; then
        # An agent is not serving (the failure under test?): drop the finalizers.
        for object in $(kn get pa -o name 2>/dev/null); do
          kn patch "$object" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 || clean=FAIL
          log "removed the finalizer of $object by hand: no agent released it within 20s"
        done
      fi
      log "deleted $(wc -w <<<"$left") PortAssignment(s)"
    fi
    k delete namespace "$NS" --wait=false >/dev/null 2>&1 || clean=FAIL
    log "deleted namespace $NS"
  fi
  rm -rf "$work"
  RESULT[i]=$clean
  printf -- '--- i. %s\n' "$clean"
  print_summary "$started" || exit 1
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------
# Helpers: PortAssignments as kubectl shows them.

# apply_example FILE NAME NODE: FILE with its NODE_NAME placeholder replaced by NODE,
# renamed NAME (one object per node in one namespace), applied in the test namespace.
apply_example() {
  local file=$1 name=$2 node=$3 manifest
  manifest=$(sed -e "s/NODE_NAME/$node/g" -e "s/^  name: .*/  name: $name/" "$file")
  if ! grep -qx "  name: $name" <<<"$manifest" || ! grep -qx "  nodeName: $node" <<<"$manifest"; then
    die "could not set the name and node of $file (has its metadata.name or spec.nodeName line moved?)"
  fi
  kn apply -f - <<<"$manifest" >/dev/null || die "kubectl apply of $file (as $name for node $node) failed"
}

# wait_ready NAME NODE: the agent has observed the object's current generation and it is Ready.
wait_ready() {
  local name=$1 node=$2 generation
  generation=$(kn get pa "$name" -o jsonpath='{.metadata.generation}')
  if ! kn wait "pa/$name" --for=jsonpath='{.status.observedGeneration}'="$generation" --timeout="${TIMEOUT}s" >/dev/null ||
    ! kn wait "pa/$name" --for=condition=Ready --timeout="${TIMEOUT}s" >/dev/null; then
    log "status of pa/$name: $(kn get pa "$name" -o jsonpath='{.status}' 2>&1 | cut -c 1-600 | grep . || echo 'none (no agent wrote one)')"
    die "pa/$name (node $node) was not Ready at generation $generation within ${TIMEOUT}s: is an agent serving node $node?"
  fi
}

# port_map NAME: "key=port" lines of the object's status, sorted by key.
port_map() { kn get pa "$1" -o jsonpath='{range .status.ports[*]}{.key}={.port}{"\n"}{end}' | sort; }

# spec_keys NAME: the object's spec keys, one a line, sorted.
spec_keys() { kn get pa "$1" -o jsonpath='{range .spec.keys[*]}{@}{"\n"}{end}' | sort; }

# check_assigned NAME: the status holds exactly the spec's keys, each with a port (in
# E2E_PORT_RANGE when set).
check_assigned() {
  local name=$1 map port
  map=$(port_map "$name")
  [ "$(cut -d= -f1 <<<"$map")" = "$(spec_keys "$name")" ] ||
    die "pa/$name: status keys [$(cut -d= -f1 <<<"$map" | tr '\n' ' ')] are not the spec keys [$(spec_keys "$name" | tr '\n' ' ')]"
  if [ -n "${E2E_PORT_RANGE:-}" ]; then
    while IFS='=' read -r _ port; do
      if [ "$port" -lt "${E2E_PORT_RANGE%-*}" ] || [ "$port" -gt "${E2E_PORT_RANGE#*-}" ]; then
        die "pa/$name: port $port is outside the agents' range $E2E_PORT_RANGE"
      fi
    done <<<"$map"
  fi
}

# check_unique_on NODE: no port is held twice on NODE, across every namespace and object.
check_unique_on() {
  local node=$1 ports dups
  ports=$(k get pa -A --field-selector "spec.nodeName=$node" \
    -o jsonpath='{range .items[*]}{range .status.ports[*]}{.port}{"\n"}{end}{end}')
  dups=$(sort <<<"$ports" | uniq -d | tr '\n' ' ')
  [ -z "$dups" ] || die "node $node: ports held by more than one key: $dups"
  log "node $node: $(count <<<"$ports") ports, all distinct"
}

# check_kept NAME OLD_MAP COUNT: the COUNT keys of OLD_MAP still in the status kept their ports.
check_kept() {
  local name=$1 now line key kept=0
  now=$(port_map "$name")
  [ -n "$2" ] || die "pa/$name: no earlier ports to compare with"
  while IFS= read -r line; do
    key=${line%%=*}
    grep -q "^$key=" <<<"$now" || continue
    grep -qxF -- "$line" <<<"$now" ||
      die "pa/$name: key $key moved from port ${line#*=} to $(grep "^$key=" <<<"$now" | cut -d= -f2)"
    kept=$((kept + 1))
  done <<<"$2"
  [ "$kept" -eq "$3" ] || die "pa/$name: $kept keys stayed, want $3"
  log "pa/$name: the $kept keys that stayed kept their ports"
}

# set_keys NAME KEY...: replaces the object's keys with a merge patch, as a user would.
set_keys() {
  local name=$1 keys; shift
  keys=$(printf '"%s",' "$@")
  kn patch pa "$name" --type merge -p "{\"spec\":{\"keys\":[${keys%,}]}}" >/dev/null ||
    die "kubectl patch of pa/$name failed"
}

# plugin ARGS...: `kubectl portassign ARGS...`; its exit status is also left in plugin_rc.
plugin_rc=0
plugin() { plugin_rc=0; k portassign "$@" || plugin_rc=$?; return "$plugin_rc"; }

# indent: kubectl output, set off in the log.
indent() { sed 's/^/    | /'; }

# count: the number of non-empty lines on stdin (grep -c fails on none).
count() { awk 'NF { n++ } END { print n + 0 }'; }

pool() { printf 'pool-%s' "$1"; }

# ---------------------------------------------------------------------------------------
step a
[ "${#NODES[@]}" -ge 1 ] || die "E2E_NODES names no node"
command -v jq >/dev/null || die "jq is needed to read 'kubectl portassign -o json' (apt-get install jq)"
command -v kubectl-portassign >/dev/null ||
  die "kubectl-portassign is not on PATH: ln -s \$PWD/target/debug/portassign <a dir on PATH>/kubectl-portassign"
k get --raw /readyz >/dev/null 2>&1 || die "the API server of $KUBECONFIG is not reachable or not ready"
k wait --for=condition=Established crd/portassignments.portassign.io --timeout=10s >/dev/null 2>&1 ||
  die "the PortAssignment CRD is not installed (helm install the chart first)"
help=$(k portassign --help 2>&1) || die "kubectl portassign --help failed: $help"
grep -q 'Usage: kubectl portassign' <<<"$help" || die "kubectl portassign --help does not name itself as a kubectl plugin: $help"
log "kubectl $(k version --client -o json | jq -r .clientVersion.gitVersion), server $(k version -o json | jq -r .serverVersion.gitVersion)"
log "nodes: ${NODES[*]}; timeout per wait: ${TIMEOUT}s; port range: ${E2E_PORT_RANGE:-not checked}"
k create namespace "$NS" >/dev/null || die "could not create namespace $NS"
ns_created=1
log "namespace $NS created"
pass

# ---------------------------------------------------------------------------------------
step b
for node in "${NODES[@]}"; do apply_example examples/pool.yaml "$(pool "$node")" "$node"; done
for node in "${NODES[@]}"; do
  wait_ready "$(pool "$node")" "$node"
  check_assigned "$(pool "$node")"
  log "pa/$(pool "$node") Ready: $(port_map "$(pool "$node")" | tr '\n' ' ')"
done
for node in "${NODES[@]}"; do check_unique_on "$node"; done
table=$(kn get pa)
header=$(head -n1 <<<"$table" | tr -s ' ')
[ "$header" = "NAME NODE KEYS ASSIGNED READY AGE" ] || die "kubectl get pa columns are '$header'"
wide=$(kn get pa -o wide)
for node in "${NODES[@]}"; do
  keys=$(spec_keys "$(pool "$node")" | count)
  row=$(awk -v n="$(pool "$node")" '$1 == n {print $2, $3, $4, $5}' <<<"$table")
  [ "$row" = "$node $keys $keys True" ] || die "kubectl get pa row of $(pool "$node"): '$row', want '$node $keys $keys True'"
  grep -Eq "^$(pool "$node") +$node +TCP +$keys +$keys +True +Allocated " <<<"$wide" ||
    die "kubectl get pa -o wide shows no 'TCP ... True Allocated' for $(pool "$node"):"$'\n'"$wide"
done
indent <<<"$table"
pass

# ---------------------------------------------------------------------------------------
step c
for node in "${NODES[@]}"; do
  name=$(pool "$node")
  key=$(spec_keys "$name" | sed -n 2p)
  want=$(port_map "$name" | sed -n "s|^$key=||p")
  # key -> port: the same key is listed on every node, so one match per node.
  plugin key "$key" -n "$NS" -o json >"$work/key.json" 2>"$work/err" ||
    die "kubectl portassign key $key -n $NS -o json exited $plugin_rc: $(cat "$work/err")"
  got=$(jq -r --arg node "$node" '.[] | select(.node == $node) | "\(.namespace) \(.name) \(.port)"' "$work/key.json")
  [ "$got" = "$NS $name $want" ] || die "kubectl portassign key $key: on node $node found '$got', want '$NS $name $want'"
  [ "$(jq length "$work/key.json")" -eq "${#NODES[@]}" ] ||
    die "kubectl portassign key $key found $(jq length "$work/key.json") matches, want ${#NODES[@]} (one per node)"
  log "key $key -> port $want on node $node (pa/$name)"

  # node + port -> key, across all namespaces: exactly one holder on the node.
  plugin port "$want" --node "$node" >"$work/port.txt" 2>"$work/err" ||
    die "kubectl portassign port $want --node $node exited $plugin_rc: $(cat "$work/err")"
  [ "$(head -n1 "$work/port.txt" | tr -s ' ')" = "NAMESPACE NAME NODE KEY PORT" ] ||
    die "kubectl portassign port: unexpected table header: $(head -n1 "$work/port.txt")"
  rows=$(tail -n +2 "$work/port.txt" | tr -s ' ')
  [ "$rows" = "$NS $name $node $key $want" ] ||
    die "kubectl portassign port $want --node $node printed '$rows', want '$NS $name $node $key $want'"
  plugin port "$want" --node "$node" -n "$NS" -o yaml >"$work/port.yaml" 2>"$work/err" ||
    die "kubectl portassign port $want --node $node -o yaml exited $plugin_rc: $(cat "$work/err")"
  if ! grep -qx -- "- namespace: $NS" "$work/port.yaml" || ! grep -qx "  key: $key" "$work/port.yaml"; then
    die "kubectl portassign port -o yaml: no key $key in: $(cat "$work/port.yaml")"
  fi
  log "port $want on node $node -> key $key (table and yaml)"

  # Ports are unique per node, not per cluster: without --node, one holder per node.
  holders=0
  for other in "${NODES[@]}"; do
    if port_map "$(pool "$other")" | grep -q "=$want$"; then holders=$((holders + 1)); fi
  done
  plugin port "$want" -n "$NS" -o json >"$work/any.json" 2>"$work/err" ||
    die "kubectl portassign port $want -n $NS exited $plugin_rc: $(cat "$work/err")"
  [ "$(jq length "$work/any.json")" -eq "$holders" ] ||
    die "kubectl portassign port $want (every node) found $(jq length "$work/any.json") holders, want $holders"
done
log "port lookups without --node return one holder per node that has the number"
plugin key no-such/key -n "$NS" >/dev/null 2>"$work/miss.txt" || :
[ "$plugin_rc" -eq 1 ] || die "kubectl portassign key no-such/key exited $plugin_rc, want 1"
grep -q 'holds no port' "$work/miss.txt" || die "a missing key's message: $(cat "$work/miss.txt")"
plugin port 1 --node "${NODES[0]}" >/dev/null 2>&1 || :
[ "$plugin_rc" -eq 1 ] || die "kubectl portassign port 1 --node ${NODES[0]} exited $plugin_rc, want 1"
log "a missing key and an unassigned port exit 1 ($(cat "$work/miss.txt"))"
pass

# ---------------------------------------------------------------------------------------
# check_resized WANT WHAT: after the keys of every node's pool changed, each pool is
# Ready with WANT ports, the 4 keys that stayed kept their ports (before[node]), and ports
# are unique per node.
check_resized() {
  local want=$1 what=$2 node name held
  for node in "${NODES[@]}"; do
    name=$(pool "$node")
    wait_ready "$name" "$node"
    check_assigned "$name"
    held=$(port_map "$name" | count)
    [ "$held" -eq "$want" ] || die "pa/$name holds $held ports after $what to $want keys"
    check_kept "$name" "${before[$node]}" 4
    check_unique_on "$node"
  done
}

step d
declare -A before=()
for node in "${NODES[@]}"; do
  name=$(pool "$node")
  before[$node]=$(port_map "$name")
  mapfile -t keys < <(spec_keys "$name")
  set_keys "$name" "${keys[@]}" team-c/sandbox-1 team-c/sandbox-2
done
check_resized 6 growing
pass

# ---------------------------------------------------------------------------------------
step e
removed=(team-a/sandbox-1 team-b/sandbox-1)
for node in "${NODES[@]}"; do
  name=$(pool "$node")
  before[$node]=$(port_map "$name")
  mapfile -t keys < <(spec_keys "$name" | grep -vxF -e "${removed[0]}" -e "${removed[1]}")
  set_keys "$name" "${keys[@]}"
done
check_resized 4 shrinking
for key in "${removed[@]}"; do
  plugin key "$key" -n "$NS" >/dev/null 2>&1 || :
  [ "$plugin_rc" -eq 1 ] || die "kubectl portassign key $key exited $plugin_rc after the key was removed, want 1"
done
log "removed keys ${removed[*]} hold no port (kubectl portassign key exits 1)"
pass

# ---------------------------------------------------------------------------------------
step f
for node in "${NODES[@]}"; do
  apply_example examples/udp.yaml "udp-$node" "$node"
  apply_example examples/tcpudp.yaml "tcpudp-$node" "$node"
done
for node in "${NODES[@]}"; do
  for name in "udp-$node" "tcpudp-$node"; do
    wait_ready "$name" "$node"
    check_assigned "$name"
    log "pa/$name Ready: $(port_map "$name" | tr '\n' ' ')"
  done
  check_unique_on "$node"
done
wide=$(kn get pa -o wide)
for node in "${NODES[@]}"; do
  if ! grep -Eq "^udp-$node +$node +UDP " <<<"$wide" || ! grep -Eq "^tcpudp-$node +$node +TCPUDP " <<<"$wide"; then
    die "kubectl get pa -o wide does not show the UDP and TCPUDP objects of $node:"$'\n'"$wide"
  fi
done
indent <<<"$wide"
pass

# ---------------------------------------------------------------------------------------
step g
# events_of NAME: the Events section of `kubectl describe pa NAME`.
events_of() { kn describe pa "$1" | sed -n '/^Events:/,$p'; }
has_events() {
  local events
  events=$(events_of "$1") &&
    grep -Eq '^ +Normal +Assigned ' <<<"$events" && grep -Eq '^ +Normal +Released ' <<<"$events"
}
for node in "${NODES[@]}"; do
  name=$(pool "$node")
  wait_until "$TIMEOUT" "kubectl describe pa $name shows the Assigned and Released events" has_events "$name"
  log "kubectl describe pa $name:"
  events_of "$name" | indent
done
pass

# ---------------------------------------------------------------------------------------
step h
mapfile -t objects < <(kn get pa -o name)
kn delete pa --all --wait=false >/dev/null || die "kubectl delete pa --all failed"
kn wait --for=delete "${objects[@]}" --timeout="${TIMEOUT}s" >/dev/null ||
  die "not deleted within ${TIMEOUT}s (finalizer not removed by an agent?): $(kn get pa -o name | tr '\n' ' ')"
[ -z "$(kn get pa -o name)" ] || die "objects left after the delete: $(kn get pa -o name | tr '\n' ' ')"
log "${#objects[@]} objects deleted and gone"
plugin key team-a/sandbox-2 -n "$NS" >/dev/null 2>&1 || :
[ "$plugin_rc" -eq 1 ] || die "kubectl portassign key team-a/sandbox-2 exited $plugin_rc after the delete, want 1"
log "kubectl portassign key team-a/sandbox-2 -n $NS exits 1: nothing left"
pass
