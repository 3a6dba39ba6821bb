#!/usr/bin/env bash
# `make run`: the whole product on this machine.
#  - With KUBECONFIG pointing at a reachable cluster: installs the CRD there and runs
#    the agent for NODE_NAME (default: this host's name) against it.
#  - Otherwise: builds (once, cached) and starts a local etcd + kube-apiserver.
# Then applies examples/pool.yaml for the node, shows the assigned ports, and keeps
# the agent running until Ctrl-C, which tears down everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\n\033[1m%s\033[0m\n' "$*"; }

kubectl_dir=$(hack/build-tools.sh kubectl)
kubectl() { "$kubectl_dir/kubectl" "$@"; }

pids=()
cp_dir=""
cleanup() {
  trap - EXIT INT TERM
  say "Stopping"
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "$cp_dir" ] && hack/control-plane.sh down "$cp_dir"
  echo "stopped."
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -n "${KUBECONFIG:-}" ] && kubectl version --request-timeout=5s >/dev/null 2>&1; then
  say "Using the cluster of KUBECONFIG=$KUBECONFIG"
  node=${NODE_NAME:-$(hostname | tr 'A-Z_' 'a-z-')}
else
  say "No cluster given: starting a local control plane (first run builds it from Go modules)"
  cp_dir=$PWD/.local/run
  export KUBECONFIG
  KUBECONFIG=$(hack/control-plane.sh up "$cp_dir")
  node=${NODE_NAME:-$(hostname | tr 'A-Z_' 'a-z-')}
fi

say "Building portassign"
cargo build --quiet
bin=${CARGO_TARGET_DIR:-target}/debug/portassign

say "Installing the CRD"
"$bin" crd | kubectl apply --server-side --force-conflicts -f -
kubectl wait --for condition=established --timeout=60s crd/portassignments.portassign.io >/dev/null

listen=${PORTASSIGN_LISTEN:-127.0.0.1:9477}
# On a node, /metrics and /debug/table need a bearer token the API server accepts for a
# user allowed to get them. Here, on loopback only, they are left open so curl can read
# them; on any other address the token stays required (see "Reading the table" below).
auth_args=()
read_with=""
case "${listen%:*}" in
  127.0.0.1|localhost|\[::1\]) auth_args=(--disable-http-auth) ;;
  *) read_with=' -H "Authorization: Bearer $(kubectl create token SERVICEACCOUNT)"' ;;
esac
say "Starting the agent for node $node (logs: .local/agent.log)"
mkdir -p .local
"$bin" agent --node-name "$node" --listen "$listen" "${auth_args[@]}" >.local/agent.log 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  curl -fsS "http://$listen/readyz" >/dev/null 2>&1 && break
  kill -0 "${pids[0]}" 2>/dev/null || { cat .local/agent.log; echo "the agent exited"; exit 1; }
  sleep 0.1
done

say "Applying examples/pool.yaml for node $node"
sed "s/NODE_NAME/$node/g" examples/pool.yaml | kubectl apply -n default -f -
kubectl wait -n default --for condition=Ready --timeout=60s pa/sandbox-pool >/dev/null
kubectl get pa -A -o wide
echo
kubectl get pa -n default sandbox-pool -o jsonpath='{range .status.ports[*]}{.key}{" -> "}{.port}{"\n"}{end}'
cat <<TXT

The agent is running. In another terminal:
  export KUBECONFIG=$KUBECONFIG
  alias kubectl=$kubectl_dir/kubectl
  kubectl get pa -A                 # objects, keys wanted/assigned, Ready
  kubectl describe pa sandbox-pool  # ports, conditions, events
  curl -s$read_with http://$listen/metrics | grep portassign_
  curl -s$read_with http://$listen/debug/table   # the agent's port table (JSON)
  $bin check --agent http://$listen   # statuses vs the agent's table
Edit spec.keys (kubectl edit pa ...) and watch ports come and go.

Get a port from a program (README, "Getting a port from a program"):
  KUBECONFIG=$KUBECONFIG $bin acquire team-a/sandbox-9 --node $node   # prints the port
  KUBECONFIG=$KUBECONFIG $bin release team-a/sandbox-9
  KUBECONFIG=$KUBECONFIG cargo run -p portassign-client --example launcher -- --node $node
    # examples/launcher.rs: acquires a port for a sandbox key, serves on it, shows it
    # reachable, releases it on Ctrl-C
Ctrl-C stops everything.
TXT
wait "${pids[0]}"
