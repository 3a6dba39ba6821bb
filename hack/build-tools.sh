#!/usr/bin/env bash
# Builds kube-apiserver, kubectl, etcd and helm (and, on request, the tools of the offline
# kind node image) from their Go modules at the pinned versions in hack/versions.env, into
# a cache outside the repository:
#   ${PORTASSIGN_TOOLS_CACHE:-$HOME/.cache/portassign/tools}/<tool>-<version>/<tool>
# A tool already in the cache is reused. Prints the bin directory of each tool.
#
# Usage: hack/build-tools.sh [TOOL ...]
#   (default: etcd kube-apiserver kubectl helm)
#   TOOL is one of: kube-apiserver kubectl etcd helm helm-unittest (prints a HELM_PLUGINS
#   directory) promtool kind, or, for hack/kind/node-image.sh,
#   kubelet kubeadm kube-controller-manager kube-scheduler kube-proxy
#   containerd (with ctr and containerd-shim-runc-v2) crictl
#   cni-plugins (host-local loopback ptp portmap) coredns pause (C, needs gcc and a
#   static libc)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${PORTASSIGN_TOOLS_CACHE:-$HOME/.cache/portassign/tools}
mkdir -p "$cache"

export CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local

log() { printf '[build-tools] %s\n' "$*" >&2; }

# tool_dir TOOL VERSION -> the cache directory for that tool at that version.
tool_dir() { printf '%s/%s-%s' "$cache" "$1" "$2"; }

# A wrapper module whose go.mod maps every k8s.io staging module that
# k8s.io/kubernetes requires at v0.0.0 to the published v0.<minor>.<patch>.
kubernetes_wrapper() {
  local dir=$1 version=$2
  local staging="v0.${version#v1.}"
  mkdir -p "$dir"
  ( cd "$dir"
    local gomod
    gomod=$(go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    [ -f "$gomod" ] || { log "could not download k8s.io/kubernetes@$version go.mod"; exit 1; }
    {
      echo "module portassign.local/kubernetes-tools"
      echo
      echo "go $(sed -n 's/^go \([0-9.]*\).*/\1/p' "$gomod")"
      echo
      echo "require k8s.io/kubernetes $version"
      echo
      awk -v v="$staging" '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" { printf "replace %s => %s %s\n", $1, $1, v }' "$gomod" | sort -u
    } > go.mod
    kubernetes_tools_go > tools.go
    go mod tidy >&2
  )
}

# Every command of k8s.io/kubernetes this script builds; tools.go imports them all so
# that `go mod tidy` records the checksums each needs.
KUBERNETES_CMDS=(kube-apiserver kubectl kubelet kubeadm kube-controller-manager kube-scheduler kube-proxy)
kubernetes_tools_go() {
  printf '//go:build tools\n\npackage tools\n\nimport (\n'
  printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "${KUBERNETES_CMDS[@]}"
  printf ')\n'
}

build_kubernetes_tool() {
  local tool=$1 out
  out=$(tool_dir "$tool" "$KUBERNETES_VERSION")
  [ -x "$out/$tool" ] && { echo "$out"; return; }
  local wrap="$cache/src/kubernetes-$KUBERNETES_VERSION"
  # A wrapper made by an older version of this script may lack the newer commands.
  if [ ! -f "$wrap/go.sum" ] || ! grep -q "cmd/$tool\"" "$wrap/tools.go"; then
    kubernetes_wrapper "$wrap" "$KUBERNETES_VERSION"
  fi
  local minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
  local date; date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  local ld=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  log "building $tool $KUBERNETES_VERSION (several minutes on a cold cache)"
  mkdir -p "$out.tmp"
  ( cd "$wrap" && go build -trimpath -ldflags "-s -w $ld" -o "$out.tmp/$tool" "k8s.io/kubernetes/cmd/$tool" )
  rm -rf "$out"; mv "$out.tmp" "$out"
  echo "$out"
}

build_etcd() {
  local out; out=$(tool_dir etcd "$ETCD_VERSION")
  [ -x "$out/etcd" ] && { echo "$out"; return; }
  local wrap="$cache/src/etcd-$ETCD_VERSION"
  mkdir -p "$wrap"
  log "building etcd $ETCD_VERSION"
  ( cd "$wrap"
    [ -f go.mod ] || go mod init portassign.local/etcd-tools >&2
    go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2
    mkdir -p "$out.tmp"
    go build -trimpath -ldflags "-s -w" -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3 )
  rm -rf "$out"; mv "$out.tmp" "$out"
  echo "$out"
}

build_helm() {
  local out; out=$(tool_dir helm "$HELM_VERSION")
  [ -x "$out/helm" ] && { echo "$out"; return; }
  local wrap="$cache/src/helm-$HELM_VERSION"
  mkdir -p "$wrap"
  local major=${HELM_VERSION%%.*}
  log "building helm $HELM_VERSION"
  ( cd "$wrap"
    [ -f go.mod ] || go mod init portassign.local/helm-tools >&2
    go get "helm.sh/helm/$major/cmd/helm@$HELM_VERSION" >&2
    mkdir -p "$out.tmp"
    # Like helm's own Makefile: default capabilities follow the client-go it is built with
    # (otherwise `helm template` assumes Kubernetes 1.20).
    local kv; kv=$(go list -m -f '{{.Version}}' k8s.io/client-go); kv=${kv#v0.}; kv=${kv%%.*}
    local ld="-s -w -X helm.sh/helm/$major/internal/version.version=$HELM_VERSION"
    for pkg in pkg/lint/rules pkg/chartutil; do
      ld+=" -X helm.sh/helm/$major/$pkg.k8sVersionMajor=1 -X helm.sh/helm/$major/$pkg.k8sVersionMinor=$kv"
    done
    go build -trimpath -ldflags "$ld" -o "$out.tmp/helm" "helm.sh/helm/$major/cmd/helm" )
  rm -rf "$out"; mv "$out.tmp" "$out"
  echo "$out"
}

# kind (for the kind stage of `make test`): `go install` builds it with its own go.mod, as kind's docs do.
build_kind() {
  local out; out=$(tool_dir kind "$KIND_VERSION")
  [ -x "$out/kind" ] && { echo "$out"; return; }
  log "building kind $KIND_VERSION"
  mkdir -p "$out.tmp"
  GOBIN="$out.tmp" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kind@$KIND_VERSION" >&2
  rm -rf "$out"; mv "$out.tmp" "$out"
  echo "$out"
}

# promtool (Prometheus's rule checker and unit tester, for the chart's PrometheusRule):
# `go install` of its command at the module version (Prometheus 3.x is published as
# module v0.3xx), like kind.
build_promtool() {
  local out; out=$(tool_dir promtool "$PROMETHEUS_VERSION")
  [ -x "$out/promtool" ] && { echo "$out"; return; }
  log "building promtool $PROMETHEUS_VERSION (a few minutes on a cold cache)"
  mkdir -p "$out.tmp"
  GOBIN="$out.tmp" go install -trimpath -ldflags "-s -w" \
    "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION" >&2
  rm -rf "$out"; mv "$out.tmp" "$out"
  echo "$out"
}

# helm-unittest, laid out as a helm plugin directory: HELM_PLUGINS=<printed dir> helm unittest
# CHART. Built from its module source with its own go.mod, as its Makefile builds it; the
# plugin.yaml written here runs that binary (the module's own would download one on install).
build_helm_unittest() {
  local out; out=$(tool_dir helm-unittest "$HELM_UNITTEST_VERSION")
  [ -x "$out/unittest/untt" ] && { echo "$out"; return; }
  local src; src=$(module_source github.com/helm-unittest/helm-unittest "$HELM_UNITTEST_VERSION" helm-unittest)
  log "building helm-unittest $HELM_UNITTEST_VERSION"
  mkdir -p "$out.tmp/unittest"
  ( cd "$src" && go build -trimpath \
      -ldflags "-s -w -X github.com/helm-unittest/helm-unittest/internal/build.version=${HELM_UNITTEST_VERSION#v}" \
      -o "$out.tmp/unittest/untt" ./cmd/helm-unittest )
  cat >"$out.tmp/unittest/plugin.yaml" <<EOF
name: unittest
version: "${HELM_UNITTEST_VERSION#v}"
usage: unit tests for helm charts
description: helm-unittest $HELM_UNITTEST_VERSION, built from its Go module by hack/build-tools.sh
command: "\$HELM_PLUGIN_DIR/untt"
EOF
  rm -rf "$out"; mv "$out.tmp" "$out"
  echo "$out"
}

# module_source MODULE VERSION NAME: a writable copy of MODULE@VERSION's source under
# $cache/src/NAME-VERSION (from the module proxy), so it builds with its own go.mod and
# go.sum, the way its Makefile would. Prints the directory.
module_source() {
  local module=$1 version=$2 name=$3 src
  src="$cache/src/$name-$version"
  if [ ! -f "$src/go.mod" ]; then
    local dir
    dir=$(go mod download -json "$module@$version" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
    [ -d "$dir" ] || { log "could not download $module@$version"; exit 1; }
    mkdir -p "$cache/src"
    rm -rf "$src.tmp"
    { cp -r "$dir" "$src.tmp" && chmod -R u+w "$src.tmp" && rm -rf "$src" && mv "$src.tmp" "$src"; } ||
      { log "could not copy the source of $module@$version to $src"; exit 1; }
  fi
  echo "$src"
}

# containerd, ctr and the runc shim, with the build tags kind's base image uses.
build_containerd() {
  local out; out=$(tool_dir containerd "$CONTAINERD_VERSION")
  [ -x "$out/containerd-shim-runc-v2" ] && { echo "$out"; return; }
  local src; src=$(module_source github.com/containerd/containerd/v2 "$CONTAINERD_VERSION" containerd) || exit 1
  log "building containerd $CONTAINERD_VERSION"
  mkdir -p "$out.tmp"
  local ld="-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION"
  ( cd "$src"
    for cmd in containerd ctr containerd-shim-runc-v2; do
      go build -trimpath -tags "no_aufs no_zfs no_btrfs no_devmapper" -ldflags "$ld" \
        -o "$out.tmp/$cmd" "./cmd/$cmd"
    done )
  rm -rf "$out"; mv "$out.tmp" "$out"
  echo "$out"
}

build_crictl() {
  local out; out=$(tool_dir crictl "$CRICTL_VERSION")
  [ -x "$out/crictl" ] && { echo "$out"; return; }
  local src; src=$(module_source sigs.k8s.io/cri-tools "$CRICTL_VERSION" cri-tools) || exit 1
  log "building crictl $CRICTL_VERSION"
  mkdir -p "$out.tmp"
  ( cd "$src" && go build -trimpath -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" \
      -o "$out.tmp/crictl" ./cmd/crictl )
  rm -rf "$out"; mv "$out.tmp" "$out"
  echo "$out"
}

# The four CNI plugins kind's node image ships.
build_cni_plugins() {
  local out; out=$(tool_dir cni-plugins "$CNI_PLUGINS_VERSION")
  [ -x "$out/portmap" ] && { echo "$out"; return; }
  local src; src=$(module_source github.com/containernetworking/plugins "$CNI_PLUGINS_VERSION" cni-plugins) || exit 1
  log "building CNI plugins $CNI_PLUGINS_VERSION"
  mkdir -p "$out.tmp"
  local ld="-s -w -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$CNI_PLUGINS_VERSION"
  ( cd "$src"
    for p in ipam/host-local main/loopback main/ptp meta/portmap; do
      go build -trimpath -ldflags "$ld" -o "$out.tmp/${p#*/}" "./plugins/$p"
    done )
  rm -rf "$out"; mv "$out.tmp" "$out"
  echo "$out"
}

build_coredns() {
  local out; out=$(tool_dir coredns "$COREDNS_VERSION")
  [ -x "$out/coredns" ] && { echo "$out"; return; }
  local src; src=$(module_source github.com/coredns/coredns "$COREDNS_VERSION" coredns) || exit 1
  log "building CoreDNS $COREDNS_VERSION"
  mkdir -p "$out.tmp"
  ( cd "$src" && go build -trimpath -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" \
      -o "$out.tmp/coredns" . )
  rm -rf "$out"; mv "$out.tmp" "$out"
  echo "$out"
}

# pause: the static C program from the kubernetes source (build/pause/linux/pause.c),
# versioned by the image tag kubeadm expects.
build_pause() {
  local out; out=$(tool_dir pause "$PAUSE_VERSION")
  [ -x "$out/pause" ] && { echo "$out"; return; }
  local src; src=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  log "building pause $PAUSE_VERSION"
  mkdir -p "$out.tmp"
  "${CC:-gcc}" -Os -Wall -Werror -static -DVERSION="v$PAUSE_VERSION-portassign" \
    -o "$out.tmp/pause" "$src/build/pause/linux/pause.c"
  strip "$out.tmp/pause" 2>/dev/null || true
  rm -rf "$out"; mv "$out.tmp" "$out"
  echo "$out"
}

tools=("$@")
[ ${#tools[@]} -gt 0 ] || tools=(etcd kube-apiserver kubectl helm)
for t in "${tools[@]}"; do
  case "$t" in
    kube-apiserver|kubectl|kubelet|kubeadm|kube-controller-manager|kube-scheduler|kube-proxy)
      build_kubernetes_tool "$t" ;;
    etcd) build_etcd ;;
    helm) build_helm ;;
    kind) build_kind ;;
    helm-unittest) build_helm_unittest ;;
    promtool) build_promtool ;;
    containerd) build_containerd ;;
    crictl) build_crictl ;;
    cni-plugins) build_cni_plugins ;;
    coredns) build_coredns ;;
    pause) build_pause ;;
    *) log "unknown tool: $t"; exit 2 ;;
  esac
done
