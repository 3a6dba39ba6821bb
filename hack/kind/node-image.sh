#!/usr/bin/env bash
# Builds the kind node image offline, the way `kind build node-image` assembles one, and
# prints its tag. `kind build node-image` itself pulls a base image and the control-plane
# images from registries; here everything comes from Debian's packages (debootstrap) and
# from source built by hack/build-tools.sh at the versions pinned in hack/versions.env.
#
#   1. rootfs: debootstrap of Debian $KIND_NODE_DEBIAN_SUITE (minbase plus what kind's base
#      image installs), from the Debian mirror apt is configured with (DEBIAN_MIRROR
#      overrides). Cached as a directory in the tool cache.
#   2. base image: that rootfs with kind's own base files (images/base/files of the kind
#      module) and the RUN steps of kind's images/base/Dockerfile; containerd, ctr, the
#      runc shim, crictl, the CNI plugins, kubelet, kubeadm and kubectl installed where
#      kind puts them; containerd's config with restrict_oom_score_adj = true (the host
#      may not let even root lower oom_score_adj) and a CNI conf_template (ptp +
#      host-local over the node's pod CIDR + portmap) instead of kindnet.
#   3. control-plane images: kube-apiserver, kube-controller-manager, kube-scheduler,
#      kube-proxy, CoreDNS, etcd and pause, each a `docker import` of its binary plus the
#      few files it needs, tagged exactly as `kubeadm config images list` prints them.
#   4. node image: the images preloaded into the node's containerd (pinned, like kind),
#      then `docker commit`.
#
# The result is tagged portassign/kind-node:<kubernetes version>-<key>, where the key
# hashes the versions it is made of and this script; an engine that has it already is not asked
# to build it again (the private engine keeps its images in its data root across runs).
# Not built: kindnet (see cluster.yaml) and kind's local-path storage provisioner (kind
# then installs its legacy host-path StorageClass).
#
# Usage: hack/kind/node-image.sh          build (or find) the image; print its tag
#        hack/kind/node-image.sh --force  build it even if the engine has it
#        hack/kind/node-image.sh --tag    print the tag only
#        hack/kind/node-image.sh rootfs   only the debootstrap stage (no engine needed)
# Needs root, Go, gcc (static libc), debootstrap (installed with apt-get if missing) and
# a Docker engine (hack/kind/lib.sh starts a private one if none answers; one started
# here is stopped again at the end unless KEEP_ENGINE=1).
set -euo pipefail
# shellcheck disable=SC2034 # used by lib.sh
KLOG_NAME=node-image
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

suite=$KIND_NODE_DEBIAN_SUITE
# What kind's base image installs, minus what only rootless or storage tests need
# (fuse-overlayfs, nfs-common, open-iscsi), plus systemd-sysv and Debian's runc.
packages=(systemd systemd-sysv conntrack iptables nftables iproute2 ethtool util-linux mount
  kmod libseccomp2 pigz e2fsprogs bash ca-certificates curl jq procps runc)
rootfs_key=$(printf '%s\n' "$suite" "${packages[@]}" | sha256sum | cut -c1-12)
rootfs="$TOOLS_CACHE/kind-rootfs-$suite-$rootfs_key"

node_key=$( { for v in KUBERNETES_VERSION ETCD_VERSION KIND_VERSION CONTAINERD_VERSION CRICTL_VERSION \
                CNI_PLUGINS_VERSION PAUSE_VERSION COREDNS_VERSION; do echo "$v=${!v}"; done
              cat "${BASH_SOURCE[0]}"; echo "$rootfs_key"; } | sha256sum | cut -c1-12)
NODE_IMAGE="portassign/kind-node:$KUBERNETES_VERSION-$node_key"
BASE_IMAGE="portassign/kind-rootfs:$suite-$rootfs_key"

if [ "${1:-}" = --tag ]; then echo "$NODE_IMAGE"; exit 0; fi

# debian_mirror: the first Debian mirror in apt's sources that serves $suite.
debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local files=() f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && files+=("$f")
  done
  [ ${#files[@]} -gt 0 ] || return 0
  # one-line format: deb [opts] URI SUITE COMPONENTS; deb822: URIs:/Suites: per paragraph.
  awk -v suite="$suite" '
    /^[[:space:]]*#/ { next }
    $1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                  if ($(i+1) == suite) { print $i; exit } next }
    /^URIs:/ { uri = $2 }
    /^Suites:/ { for (j = 2; j <= NF; j++) if ($j == suite && uri != "") { print uri; exit } }
    /^[[:space:]]*$/ { uri = "" }
  ' "${files[@]}"
}

# stage 1 ----------------------------------------------------------------------------
build_rootfs() {
  [ -f "$rootfs/.complete" ] && return
  command -v debootstrap >/dev/null || {
    klog "installing debootstrap with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap >&2
  }
  local mirror; mirror=$(debian_mirror)
  [ -n "$mirror" ] || kdie "no Debian mirror for $suite in /etc/apt/sources.list*; set DEBIAN_MIRROR"
  klog "debootstrap $suite from $mirror into $rootfs (several minutes)"
  rm -rf "$rootfs.tmp"
  local pkgs; pkgs=$(IFS=,; echo "${packages[*]}")
  debootstrap --variant=minbase --include="$pkgs" "$suite" "$rootfs.tmp" "$mirror" >&2 ||
    { tail -n 30 "$rootfs.tmp/debootstrap/debootstrap.log" >&2 2>/dev/null; kdie "debootstrap failed"; }
  # Nothing of the build host's apt state is wanted in the image.
  rm -rf "$rootfs.tmp"/var/lib/apt/lists/* "$rootfs.tmp"/var/cache/apt/archives/*.deb
  touch "$rootfs.tmp/.complete"
  rm -rf "$rootfs"; mv "$rootfs.tmp" "$rootfs"
}

if [ "${1:-}" = rootfs ]; then build_rootfs; exit 0; fi

# stage 2 ----------------------------------------------------------------------------

# have_image REF: the engine has that image.
have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# rootfs_image: the debootstrap rootfs as an image (`docker import`), once per rootfs.
rootfs_image() {
  have_image "$BASE_IMAGE" && return
  klog "docker import of the rootfs as $BASE_IMAGE"
  tar -C "$rootfs" --exclude=./.complete --numeric-owner -c . | docker import - "$BASE_IMAGE" >/dev/null
}

# The containerd config: kind's, with the pause image kubeadm expects, OOM score
# adjustments restricted to what an unprivileged process may do (runc cannot lower
# oom_score_adj without CAP_SYS_RESOURCE), and a CNI config generated per node from its
# pod CIDR by containerd itself, so no CNI daemon (kindnet) is needed.
write_containerd_config() {
  local kind_src=$1 out=$2 pause_image=$3
  sed -e "s|^\\(  *sandbox_image = \\).*|\\1\"$pause_image\"|" \
      -e 's/restrict_oom_score_adj = false/restrict_oom_score_adj = true/' \
      "$kind_src/images/base/files/etc/containerd/config.toml" > "$out"
  grep -q "sandbox_image = \"$pause_image\"" "$out" || kdie "could not set sandbox_image in kind's containerd config"
  grep -q 'restrict_oom_score_adj = true' "$out" || kdie "could not set restrict_oom_score_adj in kind's containerd config"
  cat >> "$out" <<'EOF'

# portassign: the pod network without a CNI daemon. containerd writes
# /etc/cni/net.d/10-containerd-net.conflist from this template once the kubelet passes
# it the node's pod CIDR: a veth per pod (ptp), addresses from the node's range
# (host-local), masquerade for traffic leaving the range, and hostPort (portmap).
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/opt/cni/bin"
  conf_dir = "/etc/cni/net.d"
  conf_template = "/etc/containerd/cni-template.json"
EOF
}

write_cni_template() {
  cat > "$1" <<'EOF'
{
  "cniVersion": "1.0.0",
  "name": "portassign-kind",
  "plugins": [
    {
      "type": "ptp",
      "ipMasq": true,
      "mtu": 1500,
      "ipam": {
        "type": "host-local",
        "dataDir": "/run/cni-ipam-state",
        "routes": [{"dst": "0.0.0.0/0"}],
        "ranges": [
{{- range $i, $range := .PodCIDRRanges}}{{if $i}},{{end}}
          [{"subnet": "{{$range}}"}]
{{- end}}
        ]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
}

# base_node_image CONTEXT PAUSE_IMAGE TAG: kind's base image steps on the rootfs, plus
# the node's binaries. Legacy builder: nothing is pulled, no BuildKit needed.
base_node_image() {
  local ctx=$1 pause_image=$2 tag=$3 kind_src
  kind_src=$(go mod download -json "sigs.k8s.io/kind@$KIND_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  [ -d "$kind_src/images/base/files" ] || kdie "could not download sigs.k8s.io/kind@$KIND_VERSION"
  cp -r "$kind_src/images/base/files" "$ctx/files"
  chmod -R u+w,go-w "$ctx/files"
  # Like kind's COPY --chmod: scripts 0755, everything else 0644.
  find "$ctx/files" -type d -exec chmod 0755 {} +
  find "$ctx/files" -type f -exec chmod 0644 {} +
  chmod 0755 "$ctx"/files/usr/local/bin/* "$ctx"/files/kind/bin/*
  rm "$ctx/files/etc/containerd/config.toml"
  write_containerd_config "$kind_src" "$ctx/files/etc/containerd/config.toml" "$pause_image"
  write_cni_template "$ctx/files/etc/containerd/cni-template.json"
  chmod 0644 "$ctx"/files/etc/containerd/*

  mkdir -p "$ctx/usr-local-bin" "$ctx/usr-bin" "$ctx/cni"
  local d
  d=$(tool containerd); cp "$d/containerd" "$d/ctr" "$d/containerd-shim-runc-v2" "$ctx/usr-local-bin/"
  d=$(tool crictl); cp "$d/crictl" "$ctx/usr-local-bin/"
  d=$(tool cni-plugins); cp "$d/host-local" "$d/loopback" "$d/ptp" "$d/portmap" "$ctx/cni/"
  for t in kubelet kubeadm kubectl; do cp "$(tool "$t")/$t" "$ctx/usr-bin/"; done
  chmod 0755 "$ctx"/usr-local-bin/* "$ctx"/usr-bin/* "$ctx"/cni/*

  cat > "$ctx/Dockerfile" <<EOF
FROM $BASE_IMAGE
COPY files/usr/local/bin/ /usr/local/bin/
COPY files/kind/ /kind/
COPY files/LICENSES/ /LICENSES/
COPY files/etc/ /etc/
COPY usr-local-bin/ /usr/local/bin/
COPY usr-bin/ /usr/bin/
COPY cni/ /opt/cni/bin/
# kind's images/base/Dockerfile: no services but the node's, journald without kmsg.
RUN chmod 755 /kind /kind/bin \\
 && find /lib/systemd/system/sysinit.target.wants/ -name systemd-tmpfiles-setup.service -delete \\
 && rm -f /lib/systemd/system/multi-user.target.wants/* /etc/systemd/system/*.wants/* \\
          /lib/systemd/system/local-fs.target.wants/* /lib/systemd/system/sockets.target.wants/*udev* \\
          /lib/systemd/system/sockets.target.wants/*initctl* /lib/systemd/system/basic.target.wants/* \\
 && echo ReadKMsg=no >> /etc/systemd/journald.conf \\
 && ln -sf /usr/lib/systemd/systemd /sbin/init \\
 && systemctl enable kubelet.service containerd.service undo-mount-hacks.service \\
 && systemctl mask systemd-binfmt.service \\
 && mkdir -p /etc/kubernetes/manifests /etc/cni/net.d \\
 && ctr oci spec \\
    | jq '.hooks.createContainer[.hooks.createContainer| length] |= . + {"path": "/kind/bin/mount-product-files.sh"}' \\
    | jq 'del(.process.rlimits)' > /etc/containerd/cri-base.json \\
 && echo $KUBERNETES_VERSION > /kind/version \\
 && containerd --version && kubelet --version && runc --version
ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]
EOF
  klog "docker build of the node's base layer (legacy builder)"
  DOCKER_BUILDKIT=0 docker build -q -t "$tag" "$ctx" >/dev/null
}

# stage 3 ----------------------------------------------------------------------------

# copy_with_libs ROOT DEST FILE...: FILEs of the tree at ROOT into DEST, with the shared
# libraries they load (as ROOT's own dynamic loader lists them).
copy_with_libs() {
  local root=$1 dest=$2; shift 2
  local f lib
  for f in "$@"; do
    mkdir -p "$dest$(dirname "$f")"
    cp -a "$root$f" "$dest$f"
    for lib in $(chroot "$root" /lib64/ld-linux-x86-64.so.2 --list "$f" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
      [ -e "$dest$lib" ] && continue
      mkdir -p "$dest$(dirname "$lib")"
      cp -L "$root$lib" "$dest$lib"
    done
  done
}

# image_skeleton DIR: what every control-plane image needs besides its binary: users,
# name service switch, CA bundle, a writable /tmp.
image_skeleton() {
  local dir=$1
  mkdir -p "$dir/etc/ssl/certs" "$dir/tmp" "$dir/usr/local/bin" "$dir/var/run"
  chmod 1777 "$dir/tmp"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$dir/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' > "$dir/etc/group"
  echo 'hosts: files dns' > "$dir/etc/nsswitch.conf"
  cp "$rootfs/etc/ssl/certs/ca-certificates.crt" "$dir/etc/ssl/certs/"
}

# import_image DIR TAG ENTRYPOINT-JSON: DIR as a one-layer image (the image that had the
# tag before is removed, unless something still uses it).
import_image() {
  local old; old=$(docker image inspect -f '{{.Id}}' "$2" 2>/dev/null || true)
  tar -C "$1" --owner=0 --group=0 --numeric-owner -c . |
    docker import --change "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin" \
      --change "ENTRYPOINT $3" - "$2" >/dev/null
  [ -z "$old" ] || docker rmi "$old" >/dev/null 2>&1 || true
}

# component_images CONTEXT IMAGE...: the images kubeadm asks for, from the binaries.
component_images() {
  local ctx=$1; shift
  local image name dir
  for image in "$@"; do
    name=${image##*/}; name=${name%%:*}
    dir="$ctx/images/$name"
    image_skeleton "$dir"
    case "$name" in
      kube-apiserver|kube-controller-manager|kube-scheduler)
        cp "$(tool "$name")/$name" "$dir/usr/local/bin/"
        import_image "$dir" "$image" "[\"/usr/local/bin/$name\"]" ;;
      kube-proxy)
        cp "$(tool kube-proxy)/kube-proxy" "$dir/usr/local/bin/"
        # kube-proxy programs the node with iptables (nft backend, as on the node and the
        # host) and cleans conntrack entries.
        local files=(/usr/sbin/xtables-nft-multi /usr/sbin/xtables-legacy-multi /usr/sbin/conntrack /usr/sbin/nft)
        local ext; for ext in "$rootfs"/usr/lib/x86_64-linux-gnu/xtables/*.so; do files+=("${ext#"$rootfs"}"); done
        copy_with_libs "$rootfs" "$dir" "${files[@]}"
        local n
        for n in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
          ln -sf xtables-nft-multi "$dir/usr/sbin/$n"
          ln -sf xtables-nft-multi "$dir/usr/sbin/${n/tables/tables-nft}"
          ln -sf xtables-legacy-multi "$dir/usr/sbin/${n/tables/tables-legacy}"
        done
        mkdir -p "$dir/run" "$dir/lib/modules"
        import_image "$dir" "$image" '["/usr/local/bin/kube-proxy"]' ;;
      coredns)
        # Runs as root like kubeadm's Deployment expects (it adds only NET_BIND_SERVICE).
        cp "$(tool coredns)/coredns" "$dir/coredns"
        import_image "$dir" "$image" '["/coredns"]' ;;
      etcd)
        cp "$(tool etcd)/etcd" "$dir/usr/local/bin/"
        mkdir -p "$dir/var/lib/etcd"
        import_image "$dir" "$image" '["/usr/local/bin/etcd"]' ;;
      pause)
        cp "$(tool pause)/pause" "$dir/pause"
        import_image "$dir" "$image" '["/pause"]' ;;
      *) kdie "no recipe for image $image" ;;
    esac
    klog "imported $image"
  done
}

# stage 4 ----------------------------------------------------------------------------

# preload_and_commit BASE-TAG IMAGES-TAR: like kind's build: containerd started in a
# container of the node image imports the images (pinned, not unpacked), then commit.
preload_and_commit() {
  local base=$1 tar=$2 id
  id=$(docker run -d --entrypoint=sleep --security-opt seccomp=unconfined "$base" infinity)
  # shellcheck disable=SC2064 # the id is fixed now
  trap "docker rm -f $id >/dev/null 2>&1 || true" RETURN
  docker exec "$id" bash -c 'nohup containerd >/tmp/containerd.log 2>&1 &'
  local i
  for i in $(seq 1 30); do
    docker exec "$id" ctr version >/dev/null 2>&1 && break
    [ "$i" -lt 30 ] || { docker exec "$id" cat /tmp/containerd.log >&2; kdie "containerd did not start in the build container"; }
    sleep 1
  done
  docker exec -i "$id" ctr --namespace=k8s.io images import --label=io.cri-containerd.pinned=pinned \
    --all-platforms --no-unpack --digests - < "$tar" >/dev/null
  # ctr also names the archive's own index (import-<date>); only the images are wanted.
  docker exec "$id" bash -c 'ctr --namespace=k8s.io images list -q | grep "^import-" | xargs -r ctr --namespace=k8s.io images rm' >/dev/null
  docker exec "$id" ctr --namespace=k8s.io images list -q | grep -v '^sha256:' | sed 's/^/[node-image]   preloaded /' >&2
  # Stop containerd and drop its runtime state (sockets cannot go into an image layer).
  docker exec "$id" bash -c 'pkill containerd; for i in $(seq 1 30); do pgrep containerd >/dev/null || break; sleep 0.5; done
    rm -rf /tmp/containerd.log /run/containerd /run/nri'
  docker commit --change 'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]' "$id" "$NODE_IMAGE" >/dev/null
}

# main -------------------------------------------------------------------------------
engine_up
if [ "${1:-}" != --force ] && have_image "$NODE_IMAGE"; then
  klog "cached: $NODE_IMAGE"
  echo "$NODE_IMAGE"
  engine_release
  exit 0
fi
started=$(date +%s)
build_rootfs
# Every binary first (a cold build compiles for a long time), then the images.
for t in containerd crictl cni-plugins pause kubelet kubeadm kubectl kube-apiserver \
         kube-controller-manager kube-scheduler kube-proxy etcd coredns; do
  tool "$t" >/dev/null
done
rootfs_image

ctx=$(mktemp -d "${TMPDIR:-/tmp}/portassign-node-image.XXXXXX")
trap 'rm -rf "$ctx"; engine_release' EXIT
mapfile -t required < <("$(tool kubeadm)/kubeadm" config images list --kubernetes-version "$KUBERNETES_VERSION")
pause_image=$(printf '%s\n' "${required[@]}" | grep /pause:)
[ "$pause_image" = "registry.k8s.io/pause:$PAUSE_VERSION" ] ||
  kdie "kubeadm $KUBERNETES_VERSION expects $pause_image; set PAUSE_VERSION in hack/versions.env to match"
coredns_image=$(printf '%s\n' "${required[@]}" | grep /coredns:)
[ "${coredns_image##*:}" = "$COREDNS_VERSION" ] ||
  kdie "kubeadm $KUBERNETES_VERSION expects $coredns_image; set COREDNS_VERSION in hack/versions.env to match"
component_images "$ctx" "${required[@]}"
docker save "${required[@]}" > "$ctx/images.tar"

base_node_image "$ctx" "$pause_image" "$NODE_IMAGE-base"
old_node=$(docker image inspect -f '{{.Id}}' "$NODE_IMAGE" 2>/dev/null || true)
preload_and_commit "$NODE_IMAGE-base" "$ctx/images.tar"
docker rmi "$NODE_IMAGE-base" >/dev/null 2>&1 || true
# Node images of older recipes (or the one --force replaced) only take space, about 1 GB
# each; those a cluster still runs on stay.
{ [ -z "$old_node" ] || echo "$old_node"
  docker images portassign/kind-node --format '{{.Repository}}:{{.Tag}}' | grep -vx "$NODE_IMAGE"
} | xargs -r docker rmi >/dev/null 2>&1 || true
klog "built $NODE_IMAGE in $(($(date +%s) - started)) s ($(docker image inspect -f '{{.Size}}' "$NODE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
echo "$NODE_IMAGE"
