#!/usr/bin/env bash
# A real, local Kubernetes control plane: etcd + kube-apiserver on free loopback ports,
# built from their Go modules by hack/build-tools.sh (cached). Like envtest, there is
# no scheduler, kubelet or controller-manager: the API server is what we test against.
#
#   hack/control-plane.sh up DIR     start (or reuse) a control plane in DIR; prints the kubeconfig path
#   hack/control-plane.sh down DIR   stop it and remove DIR
#   hack/control-plane.sh restart DIR  stop etcd + kube-apiserver and start them again on the same data
#
# Environment:
#   PORTASSIGN_OWNER_PID   stop the control plane when this process exits (used by the test harness)
#   PORTASSIGN_APISERVER_BIND  address kube-apiserver listens on (default 127.0.0.1)
#   PORTASSIGN_APISERVER_SANS  extra IP SANs for its serving certificate, comma separated
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { printf '[control-plane] %s\n' "$*" >&2; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

tools() {
  local dirs
  dirs=$("$here/build-tools.sh" etcd kube-apiserver kubectl)
  ETCD=$(sed -n 1p <<<"$dirs")/etcd
  APISERVER=$(sed -n 2p <<<"$dirs")/kube-apiserver
  KUBECTL=$(sed -n 3p <<<"$dirs")/kubectl
}

certs() {
  local dir=$1 sans="IP:127.0.0.1,DNS:localhost"
  local extra=${PORTASSIGN_APISERVER_SANS:-}
  [ -n "$extra" ] && sans+=",$(sed 's/\([^,]*\)/IP:\1/g' <<<"$extra")"
  mkdir -p "$dir/pki"
  ( cd "$dir/pki"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout ca.key -out ca.crt \
      -subj "/CN=portassign-local-ca" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout serving.key -out serving.csr \
      -subj "/CN=kube-apiserver" 2>/dev/null
    printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' "$sans" > serving.ext
    openssl x509 -req -in serving.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile serving.ext -out serving.crt 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    head -c 24 /dev/urandom | base64 | tr -d '/+=' > admin.token
    printf '%s,admin,admin,system:masters\n' "$(cat admin.token)" > tokens.csv )
}

start_processes() {
  local dir=$1
  # shellcheck disable=SC1091
  source "$dir/ports.env"
  mkdir -p "$dir/etcd-data" "$dir/logs"
  setsid "$ETCD" --name default --data-dir "$dir/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "default=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync --quota-backend-bytes=8589934592 \
    --log-level warn >>"$dir/logs/etcd.log" 2>&1 &
  echo $! > "$dir/etcd.pid"
  setsid "$APISERVER" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address "${PORTASSIGN_APISERVER_BIND:-127.0.0.1}" --advertise-address 127.0.0.1 --secure-port "$APISERVER_PORT" \
    --tls-cert-file "$dir/pki/serving.crt" --tls-private-key-file "$dir/pki/serving.key" \
    --client-ca-file "$dir/pki/ca.crt" --token-auth-file "$dir/pki/tokens.csv" \
    --authorization-mode RBAC --service-cluster-ip-range 10.96.0.0/24 \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$dir/pki/sa.pub" --service-account-signing-key-file "$dir/pki/sa.key" \
    --api-audiences https://kubernetes.default.svc.cluster.local \
    --disable-admission-plugins ServiceAccount --allow-privileged=true \
    --max-requests-inflight 2000 --max-mutating-requests-inflight 1000 \
    --v 0 >>"$dir/logs/kube-apiserver.log" 2>&1 &
  echo $! > "$dir/kube-apiserver.pid"
  local token; token=$(cat "$dir/pki/admin.token")
  for _ in $(seq 1 600); do
    if curl -fsS --cacert "$dir/pki/ca.crt" -H "Authorization: Bearer $token" \
        "https://127.0.0.1:$APISERVER_PORT/readyz" >/dev/null 2>&1; then
      return 0
    fi
    if ! kill -0 "$(cat "$dir/kube-apiserver.pid")" 2>/dev/null || ! kill -0 "$(cat "$dir/etcd.pid")" 2>/dev/null; then
      log "a control-plane process exited; last lines of its logs:"
      tail -n 20 "$dir/logs/etcd.log" "$dir/logs/kube-apiserver.log" >&2
      return 1
    fi
    sleep 0.1
  done
  log "kube-apiserver was not ready after 60s; see $dir/logs/kube-apiserver.log"
  return 1
}

stop_processes() {
  local dir=$1 sig=${2:-TERM}
  for p in kube-apiserver etcd; do
    if [ -f "$dir/$p.pid" ]; then
      local pid; pid=$(cat "$dir/$p.pid")
      kill -"$sig" "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
      rm -f "$dir/$p.pid"
    fi
  done
}

write_kubeconfig() {
  local dir=$1
  # shellcheck disable=SC1091
  source "$dir/ports.env"
  cat > "$dir/kubeconfig" <<YAML
apiVersion: v1
kind: Config
clusters:
- name: portassign-local
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(base64 -w0 < "$dir/pki/ca.crt")
users:
- name: admin
  user:
    token: $(cat "$dir/pki/admin.token")
contexts:
- name: portassign-local
  context: { cluster: portassign-local, user: admin, namespace: default }
current-context: portassign-local
YAML
}

up() {
  local dir=$1
  mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
  if [ -f "$dir/kube-apiserver.pid" ] && kill -0 "$(cat "$dir/kube-apiserver.pid")" 2>/dev/null; then
    echo "$dir/kubeconfig"; return 0
  fi
  tools
  [ -f "$dir/pki/ca.crt" ] || certs "$dir"
  if [ ! -f "$dir/ports.env" ]; then
    printf 'ETCD_PORT=%s\nETCD_PEER_PORT=%s\nAPISERVER_PORT=%s\n' "$(free_port)" "$(free_port)" "$(free_port)" > "$dir/ports.env"
  fi
  local started; started=$(date +%s.%N)
  start_processes "$dir"
  write_kubeconfig "$dir"
  log "ready in $(printf '%.1f' "$(echo "$(date +%s.%N) - $started" | bc)")s: export KUBECONFIG=$dir/kubeconfig"
  if [ -n "${PORTASSIGN_OWNER_PID:-}" ]; then
    # Watchdog: tear the control plane down when the owner (a test process) is gone.
    ( exec </dev/null >/dev/null 2>&1
      while kill -0 "$PORTASSIGN_OWNER_PID" 2>/dev/null; do sleep 1; done
      stop_processes "$dir"; rm -rf "$dir" ) &
    disown
  fi
  echo "$dir/kubeconfig"
}

case "${1:-}" in
  up) up "${2:?usage: $0 up DIR}" ;;
  down) stop_processes "${2:?usage: $0 down DIR}"; rm -rf "$2" ;;
  restart)
    dir=${2:?usage: $0 restart DIR}; tools
    stop_processes "$dir" "${3:-TERM}"; start_processes "$dir" ;;
  *) echo "usage: $0 up|down|restart DIR" >&2; exit 2 ;;
esac
