# shellcheck shell=bash
# Helpers shared by the hack/ test scripts (test-chart.sh, e2e-*.sh); sourced, not run.
#
#  - Steps and a summary: a script fills STEPS=(a b ...) and TITLE[a]="...", calls
#    `step a` ... `pass`, `log` and `die`; its EXIT trap calls `mark_failed` and
#    `print_summary`, which lists every step as PASS, FAIL or NOT RUN.
#  - wait_until: poll a command with a deadline.
#  - resolve_tools: HELM / KUBECTL / KIND from the environment, else built (cached) by
#    hack/build-tools.sh.
#  - sa_kubeconfig: a kubeconfig that authenticates as a ServiceAccount (TokenRequest).
#  - start_agent / agent_ready / stop_process: a local `portassign agent` process.
#
# Optional hooks a script may define: on_die (runs before `die` exits, e.g. to show a
# log) and on_poll (runs between two tries of wait_until, e.g. to check a process).

if [ "${BASH_VERSINFO[0]}" -lt 4 ]; then
  echo "bash 4 or newer is needed (this is bash $BASH_VERSION)" >&2
  exit 2
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PORTASSIGN_BIN=${PORTASSIGN_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/debug/portassign}

# ---------------------------------------------------------------------------------------
# Steps and summary.

STEPS=()
declare -A TITLE=() RESULT=()
current=""

step() {
  current=$1
  printf '\n=== %s. %s\n' "$1" "${TITLE[$1]}"
}
pass() { RESULT[$current]=PASS; printf -- '--- %s. PASS\n' "$current"; }
log() { printf '    %s\n' "$*"; }
die() {
  printf '\nFAIL (step %s): %s\n' "${current:-setup}" "$*" >&2
  if declare -F on_die >/dev/null; then on_die || true; fi
  exit 1
}
# An unexpected failing command (set -e) names itself and its line.
trap 'printf "\nFAIL (step %s): command exited %s at line %s: %s\n" "${current:-setup}" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR

# mark_failed: the step under way when the script stopped failed (call first thing in
# the EXIT trap, with the script's exit status in $1).
mark_failed() {
  if [ "$1" -ne 0 ] && [ -n "$current" ] && [ -z "${RESULT[$current]:-}" ]; then
    RESULT[$current]=FAIL
  fi
}

# print_summary STARTED_EPOCH: every step's result; fails unless every step passed.
print_summary() {
  local s overall=PASS
  printf '\n=== Summary (%ss)\n' "$(($(date +%s) - $1))"
  for s in "${STEPS[@]}"; do
    printf '  %-7s %s. %s\n' "${RESULT[$s]:-NOT RUN}" "$s" "${TITLE[$s]}"
    [ "${RESULT[$s]:-}" = PASS ] || overall=FAIL
  done
  printf '%s\n' "$overall"
  [ "$overall" = PASS ]
}

# wait_until SECONDS WHAT COMMAND...: polls COMMAND every half second until it succeeds;
# dies saying WHAT when SECONDS have passed.
wait_until() {
  local timeout=$1 what=$2; shift 2
  local deadline=$(($(date +%s) + timeout))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      die "timed out after ${timeout}s waiting until $what"
    fi
    if declare -F on_poll >/dev/null; then on_poll; fi
    sleep 0.5
  done
}

# ---------------------------------------------------------------------------------------
# Tools.

# resolve_tools TOOL...: sets HELM, KUBECTL, KIND (upper-cased tool name) for each TOOL
# not already set, building it into the cache with hack/build-tools.sh if needed.
resolve_tools() {
  local tool var dirs i=0 missing=()
  for tool in "$@"; do
    var=${tool^^}; var=${var//-/_}
    [ -n "${!var:-}" ] || missing+=("$tool")
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  dirs=$("$REPO/hack/build-tools.sh" "${missing[@]}") || die "could not build ${missing[*]} (hack/build-tools.sh)"
  for tool in "${missing[@]}"; do
    i=$((i + 1))
    var=${tool^^}; var=${var//-/_}
    printf -v "$var" '%s/%s' "$(sed -n "${i}p" <<<"$dirs")" "$tool"
  done
}

# ---------------------------------------------------------------------------------------
# Credentials.

# sa_kubeconfig NAMESPACE SERVICEACCOUNT FILE: writes FILE, a kubeconfig for the cluster
# of $KUBECONFIG's current context that authenticates with a token minted for the
# ServiceAccount (TokenRequest API, one hour), and checks the API server sees that identity.
sa_kubeconfig() {
  local ns=$1 sa=$2 file=$3 token server ca_data ca_file whoami
  token=$("$KUBECTL" create token "$sa" -n "$ns" --duration=1h) || die "could not mint a token for $ns/$sa"
  server=$("$KUBECTL" config view --raw --minify -o jsonpath='{.clusters[0].cluster.server}')
  ca_data=$("$KUBECTL" config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
  if [ -z "$ca_data" ]; then
    ca_file=$("$KUBECTL" config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority}')
    [ -n "$ca_file" ] || die "the kubeconfig ${KUBECONFIG:-} names no certificate authority for $server"
    ca_data=$(base64 <"$ca_file" | tr -d '\n')
  fi
  (umask 077 && cat >"$file" <<YAML
apiVersion: v1
kind: Config
clusters:
- name: cluster
  cluster: {server: "$server", certificate-authority-data: "$ca_data"}
users:
- name: $sa
  user: {token: "$token"}
contexts:
- name: $sa
  context: {cluster: cluster, user: $sa}
current-context: $sa
YAML
  )
  whoami=$(KUBECONFIG=$file "$KUBECTL" auth whoami -o jsonpath='{.status.userInfo.username}')
  [ "$whoami" = "system:serviceaccount:$ns:$sa" ] || die "the kubeconfig minted for $ns/$sa authenticates as '$whoami'"
}

# ---------------------------------------------------------------------------------------
# A local agent process.

# start_agent KUBECONFIG NODE RANGE NAME LOG: starts `portassign agent` for NODE in the
# background, its HTTP server on a free loopback port, settings only from these
# arguments (none inherited from the environment). Sets AGENT_PID.
start_agent() {
  local kubeconfig=$1 node=$2 range=$3 name=$4 agent_log=$5
  env -u NODE_NAME -u POD_NAME -u PORTASSIGN_PORT_RANGE -u PORTASSIGN_CONCURRENCY -u PORTASSIGN_LISTEN \
    -u PORTASSIGN_LOG_FORMAT KUBECONFIG="$kubeconfig" RUST_LOG=info \
    "$PORTASSIGN_BIN" agent --node-name "$node" --listen 127.0.0.1:0 \
    --port-range "$range" --pod-name "$name" --log-format human \
    >"$agent_log" 2>&1 &
  # shellcheck disable=SC2034 # for the caller
  AGENT_PID=$!
}

# agent_http LOG: the address of the agent's HTTP server, from its start line.
agent_http() { sed -n 's/.*agent starting.* http=\([0-9.:]*\).*/\1/p;T;q' "$1" | grep .; }

# agent_ready LOG: the agent's /readyz answers OK (its table is rebuilt).
agent_ready() {
  local http
  http=$(agent_http "$1") && curl -fsS --max-time 2 "http://$http/readyz" >/dev/null
}

# stop_process PID: SIGTERM, then SIGKILL after 5 s; fails if SIGKILL was needed.
stop_process() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  kill -CONT "$pid" 2>/dev/null || true  # a stopped process handles SIGTERM only when continued
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    return 1
  fi
  wait "$pid" 2>/dev/null || true
}

# build_plugin DIR: builds the portassign binary and puts it on PATH as the kubectl
# plugin DIR/kubectl-portassign.
build_plugin() {
  local dir=$1
  cargo build --locked --bin portassign >"$dir/cargo.log" 2>&1 || { tail -n 40 "$dir/cargo.log"; die "cargo build failed"; }
  [ -x "$PORTASSIGN_BIN" ] || die "$PORTASSIGN_BIN is missing after cargo build"
  mkdir -p "$dir/bin"
  ln -sf "$PORTASSIGN_BIN" "$dir/bin/kubectl-portassign"
  export PATH="$dir/bin:$PATH"
  log "kubectl-portassign -> $PORTASSIGN_BIN"
}
