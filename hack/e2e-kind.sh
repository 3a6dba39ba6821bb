#!/usr/bin/env bash
# `make e2e-kind`: runs hack/e2e-suite.sh on a kind cluster, where the agent runs as the
# chart's DaemonSet from the image the Dockerfile builds. Needs a Docker engine, so CI
# (which has none) does not run it; `make e2e` runs the same suite on a local control plane.
#
#   1. a kind cluster from hack/kind.yaml (control plane + worker), unless one exists
#   2. docker build -t portassign:e2e . ; kind load docker-image
#   3. helm upgrade --install the chart with that image; DaemonSet rolled out on every node
#   4. hack/e2e-suite.sh with E2E_NODES = the cluster's nodes
#   5. kind delete cluster, unless KEEP_CLUSTER=1
#
# Environment:
#   KIND_CLUSTER     cluster name (default portassign-e2e); an existing one is reused
#   KEEP_CLUSTER=1   keep the cluster (and the release in it) after the run
#   KIND_NODE_IMAGE  node image for a new cluster (default: kind's own for its version)
#   E2E_TIMEOUT      passed to the suite: seconds to wait for any one thing (default 60)
#   KIND, KUBECTL, HELM  tool paths (default: on PATH, else built by hack/build-tools.sh
#                    at the versions in hack/versions.env, which needs Go)
# The cluster's kubeconfig is kept in a temporary file: ~/.kube/config is not touched.
set -Eeuo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"

cluster=${KIND_CLUSTER:-portassign-e2e}
NAMESPACE=portassign-e2e
RELEASE=portassign-e2e # the chart names the DaemonSet after the release
IMAGE_REPOSITORY=portassign
IMAGE_TAG=e2e
RANGE=20000-29999 # the chart's default, set explicitly so the suite can check it
started=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/portassign-e2e-kind.XXXXXX")

STEPS=(a b c d e f)
TITLE=(
  [a]="preconditions: docker with a running engine, kind, kubectl, helm, cargo"
  [b]="kind cluster $cluster (hack/kind.yaml)"
  [c]="docker build -t $IMAGE_REPOSITORY:$IMAGE_TAG . ; kind load docker-image"
  [d]="helm upgrade --install the chart; DaemonSet ready on every node"
  [e]="the e2e suite (hack/e2e-suite.sh)"
  [f]="cleanup: kind cluster deleted (unless KEEP_CLUSTER=1)"
)

# diagnose: what the agent pods say, when they are not ready or the suite failed.
diagnose() {
  echo "--- agent pods, their events and logs:" >&2
  "$KUBECTL" get pods -n "$NAMESPACE" -o wide >&2 || true
  "$KUBECTL" describe pods -n "$NAMESPACE" -l "app.kubernetes.io/instance=$RELEASE" | sed -n '/^Events:/,/^$/p' >&2 || true
  "$KUBECTL" logs -n "$NAMESPACE" -l "app.kubernetes.io/instance=$RELEASE" --tail=20 --prefix >&2 || true
}

have_cluster=""
cleanup() {
  local rc=$?
  trap - ERR
  set +e
  mark_failed "$rc"
  current=f
  printf '\n=== f. %s\n' "${TITLE[f]}"
  local clean=PASS
  if [ -n "$have_cluster" ]; then
    if [ "${KEEP_CLUSTER:-}" = 1 ]; then
      log "kept: kind cluster $cluster with release $RELEASE (KEEP_CLUSTER=1)"
      log "  $KIND get kubeconfig --name $cluster > kubeconfig; $KIND delete cluster --name $cluster"
    else
      if "$KIND" delete cluster --name "$cluster" >/dev/null 2>&1; then
        log "deleted kind cluster $cluster"
      else
        clean=FAIL; log "kind delete cluster --name $cluster failed"
      fi
    fi
  else
    log "no cluster to delete"
  fi
  rm -rf "$work"
  RESULT[f]=$clean
  printf -- '--- f. %s\n' "$clean"
  print_summary "$started" || exit 1
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------
step a
command -v docker >/dev/null ||
  die "docker is not installed: make e2e-kind needs Docker (a CLI and a running engine). Without one, run make e2e (local control plane)"
if ! out=$(docker info 2>&1); then
  printf '%s\n' "$out" | grep -v '^[[:space:]]*$' | tail -n 2 | sed 's/^/    docker info: /' >&2
  die "no Docker engine answers (docker info failed): start Docker, or run make e2e (local control plane) instead"
fi
log "docker engine $(docker version --format '{{.Server.Version}}' 2>/dev/null)"
command -v jq >/dev/null || die "jq is needed by the suite (apt-get install jq)"
command -v cargo >/dev/null || die "cargo is needed to build the kubectl-portassign plugin"
for tool in kind kubectl helm; do
  var=${tool^^}
  [ -n "${!var:-}" ] || printf -v "$var" '%s' "$(command -v "$tool" || true)"
done
resolve_tools kind kubectl helm # builds only those neither set nor on PATH
log "kind: $KIND ($("$KIND" version))"
log "kubectl: $KUBECTL, helm: $HELM"
build_plugin "$work"
pass

# ---------------------------------------------------------------------------------------
step b
export KUBECONFIG=$work/kubeconfig
if "$KIND" get clusters 2>/dev/null | grep -qx "$cluster"; then
  "$KIND" get kubeconfig --name "$cluster" >"$KUBECONFIG"
  have_cluster=1
  log "reusing the existing kind cluster $cluster"
else
  have_cluster=1 # from here on, a half-created cluster is deleted too
  "$KIND" create cluster --name "$cluster" --config hack/kind.yaml --kubeconfig "$KUBECONFIG" \
    --wait 180s ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"} || die "kind create cluster failed"
fi
"$KUBECTL" wait --for=condition=Ready nodes --all --timeout=180s >/dev/null || die "the nodes of $cluster are not Ready"
read -r -a nodes <<<"$("$KUBECTL" get nodes -o jsonpath='{.items[*].metadata.name}')"
[ "${#nodes[@]}" -ge 2 ] || die "cluster $cluster has ${#nodes[@]} node(s), want 2 (hack/kind.yaml); delete it: $KIND delete cluster --name $cluster"
log "nodes: ${nodes[*]} (Kubernetes $("$KUBECTL" get --raw /version | jq -r .gitVersion))"
pass

# ---------------------------------------------------------------------------------------
step c
DOCKER_BUILDKIT=1 docker build -t "$IMAGE_REPOSITORY:$IMAGE_TAG" . || die "docker build failed"
image_id=$(docker image inspect -f '{{.Id}}' "$IMAGE_REPOSITORY:$IMAGE_TAG")
"$KIND" load docker-image "$IMAGE_REPOSITORY:$IMAGE_TAG" --name "$cluster" || die "kind load docker-image failed"
log "image $IMAGE_REPOSITORY:$IMAGE_TAG ($image_id) loaded into every node"
pass

# ---------------------------------------------------------------------------------------
step d
if "$KUBECTL" get crd portassignments.portassign.io >/dev/null 2>&1; then
  # helm installs a chart's CRDs only when absent; bring an existing one up to date.
  "$KUBECTL" apply --server-side --force-conflicts -f charts/portassign/crds/ >/dev/null
fi
# The image ID as a pod annotation: a rebuilt image rolls the DaemonSet on a reused cluster.
"$HELM" upgrade --install "$RELEASE" charts/portassign -n "$NAMESPACE" --create-namespace \
  --set image.repository="$IMAGE_REPOSITORY" --set image.tag="$IMAGE_TAG" --set image.pullPolicy=Never \
  --set portRange.first="${RANGE%-*}" --set portRange.last="${RANGE#*-}" \
  --set-string podAnnotations.e2e-image-id="$image_id" >/dev/null || die "helm upgrade --install failed"
if ! "$KUBECTL" rollout status "daemonset/$RELEASE" -n "$NAMESPACE" --timeout=180s; then
  diagnose
  die "the DaemonSet $RELEASE did not roll out within 180s"
fi
ready=$("$KUBECTL" get "daemonset/$RELEASE" -n "$NAMESPACE" -o jsonpath='{.status.numberReady}')
[ "$ready" = "${#nodes[@]}" ] || { diagnose; die "$ready agent pods ready, want one per node (${#nodes[@]})"; }
log "DaemonSet $RELEASE: $ready/${#nodes[@]} agents ready"
pass

# ---------------------------------------------------------------------------------------
step e
if ! E2E_NODES="${nodes[*]}" E2E_PORT_RANGE=$RANGE KUBECTL=$KUBECTL hack/e2e-suite.sh; then
  diagnose
  die "the e2e suite failed (above)"
fi
pass
