#!/usr/bin/env bash
# `make bench`: run the benchmarks and regenerate docs/benchmarks.md and docs/convergence.svg.
#
#   1. allocator: the port table + real probe vs the seed's algorithm (no control plane)
#   2. cluster:   convergence and restart against a local etcd + kube-apiserver
#                 (hack/control-plane.sh, torn down at the end), agent vs write floor
#   3. scale:     M agents (1, 10, 50, 100) on the same control plane, a relist storm
#                 (API server restarted under 100 agents), refused status writes
#   4. acquire:   latency of getting a port (client API and a plain key vs a minimal
#                 responder's floor), same control plane; its own section of the report
#   5. fanout:    kube-apiserver's CPU per write and watch-event latency against 1 to 3,000
#                 open watches (the agents' field selector, and one namespace each), one light
#                 process holding them; same control plane
#   6. report:    Markdown table(s) and the plots (docs/convergence.svg, docs/scale.svg), every
#                 ratio computed from this run
#
# The benchmarks are the workspace member portassign-bench (bench/). The agent the cluster
# benchmark measures is the product's release build, made here first (cargo bench builds
# only the bench package's targets); PORTASSIGN_BIN is cleared so that build is the one
# the test kit finds, target/release/portassign, next to the bench binaries.
# Raw results and every process's log are kept in target/bench/.
# Environment: BENCH_SIZES (default 100,300,1000) objects per convergence run;
# BENCH_RESTART_OBJECTS (default 2500, × 4 keys = 10,000 ports); BENCH_SCALE_AGENTS (default
# 1,10,50,100), BENCH_SCALE_OBJECTS (default 1000) objects spread over them; BENCH_FAILING
# (default 50,1000) objects per refused agent, watched for BENCH_FAILING_SECONDS (default 150).
# BENCH_ACQUIRE_SAMPLES (default 200) acquires of each kind. BENCH_FANOUT_WATCHERS (default
# 1,10,100,1000,3000) open watches, one run each.
set -euo pipefail
cd "$(dirname "$0")/.."
# Absolute paths: cargo runs each bench binary in its package's folder (bench/).
root=$PWD
out=$root/target/bench
rm -rf "$out"; mkdir -p "$out/logs" docs
commands=$out/commands.txt
: > "$commands"
started=$(date +%s)

# Runs a command and records it, with how long it took, for the report (paths in the
# repository shown relative to it).
run() {
  local t0 shown=${*//$root\//}; t0=$(date +%s.%N)
  printf '\n== %s\n' "$shown" >&2
  "$@"
  printf '%6.1f  %s\n' "$(echo "$(date +%s.%N) - $t0" | bc)" "$shown" >> "$commands"
}

unset PORTASSIGN_BIN
run cargo build --release --locked -p portassign --bin portassign
run cargo bench --locked -p portassign-bench --no-run
run cargo bench --locked -p portassign-bench --bench allocator -- --out "$out/allocator.json"

cp_dir=$(mktemp -d /tmp/portassign-bench-cp.XXXXXX)
trap 'hack/control-plane.sh down "$cp_dir" >/dev/null 2>&1 || true' EXIT
t0=$(date +%s.%N)
kubeconfig=$(hack/control-plane.sh up "$cp_dir")
printf '%6.1f  %s\n' "$(echo "$(date +%s.%N) - $t0" | bc)" "hack/control-plane.sh up $cp_dir" >> "$commands"

run cargo bench --locked -p portassign-bench --bench cluster -- --kubeconfig "$kubeconfig" --cp-dir "$cp_dir" \
  --logs "$out/logs" --sizes "${BENCH_SIZES:-100,300,1000}" \
  --restart-objects "${BENCH_RESTART_OBJECTS:-2500}" --out "$out/cluster.json"
run cargo bench --locked -p portassign-bench --bench scale -- --kubeconfig "$kubeconfig" --cp-dir "$cp_dir" \
  --logs "$out/logs" --agents "${BENCH_SCALE_AGENTS:-1,10,50,100}" --objects "${BENCH_SCALE_OBJECTS:-1000}" \
  --failing "${BENCH_FAILING:-50,1000}" --failing-seconds "${BENCH_FAILING_SECONDS:-150}" --out "$out/scale.json"
run cargo bench --locked -p portassign-bench --bench acquire -- --kubeconfig "$kubeconfig" \
  --logs "$out/logs" --samples "${BENCH_ACQUIRE_SAMPLES:-200}" --out "$out/acquire.json"
run cargo bench --locked -p portassign-bench --bench fanout -- --kubeconfig "$kubeconfig" --cp-dir "$cp_dir" \
  --logs "$out/logs" --watchers "${BENCH_FANOUT_WATCHERS:-1,10,100,1000,3000}" --out "$out/fanout.json"
hack/control-plane.sh down "$cp_dir" >/dev/null 2>&1 || true
trap - EXIT
printf '%6.1f  %s\n' 0 "hack/control-plane.sh down $cp_dir" >> "$commands"
printf '%6d  %s\n' "$(( $(date +%s) - started ))" "(total before the report)" >> "$commands"

cargo bench --locked -p portassign-bench --bench report -- --allocator "$out/allocator.json" --cluster "$out/cluster.json" \
  --scale "$out/scale.json" --acquire "$out/acquire.json" --fanout "$out/fanout.json" --commands "$commands" --md "$root/docs/benchmarks.md"
echo "make bench: done in $(( $(date +%s) - started ))s; see docs/benchmarks.md" >&2
