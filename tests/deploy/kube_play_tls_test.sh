#!/usr/bin/env bash
# Deploy test: runs the prod overlay's Deployment (TLS on the gRPC port, bearer tokens, HTTPS
# and basic auth on /metrics, the probes' plaintext health-only listener, directory galleries
# from the claim) with `podman kube play`, with certificates from tests/security/make_certs.sh
# in place of cert-manager's, and checks it end to end (tests/deploy/smoke_client.py): the
# health-only port answers SERVING in plaintext and serves nothing else, the gRPC port refuses
# plaintext and calls without a valid token, real calls over TLS with the token match
# scikit-learn, /metrics refuses plain HTTP and a missing password; then SIGTERM -> exit 0.
# podman runs no probes: the probe port is checked by calling it the way the kubelet does.
# Test-only changes, made with a kustomize overlay on top of overlays/prod: the local image,
# the host network with the three listeners on free loopback ports and no declared container
# ports (as in kube_play_test.sh), and hostPath directories in place of the Secret and claim
# volumes, holding the same keys under the same mount paths: podman 4.3 writes a Secret's
# `data` into the volume still base64-encoded and ignores defaultMode, so its Secret volumes
# cannot stand in for the kubelet's (k8s_test.sh checks the real volumes of the overlay).
# Usage: kube_play_tls_test.sh [WORK_DIR]   (needs the image from image_test.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
WORK="${1:-$(mktemp -d)}"
rm -rf "$WORK" && mkdir -p "$WORK/overlay" "$WORK/certs"
deploy_podman_env
podman image exists "$SIMSERVE_IMAGE" || die "$SIMSERVE_IMAGE missing: run image_test.sh first"
# The server ignores SIMSERVE_* variables it does not know: an older server would silently
# serve what the overlay asks to secure. Say so plainly instead of failing on a symptom.
flags=$(podman run --rm --pull=never --network=none --entrypoint /usr/local/bin/simserve \
  "$SIMSERVE_IMAGE" --help 2>&1 || true)
for flag in tls_cert_file auth_token_file health_listen metrics_tls_cert_file metrics_basic_auth_file; do
  grep -q -- "--$flag " <<<"$flags" || die "the server in $SIMSERVE_IMAGE has no --$flag, which the prod overlay sets"
done

ports=()
while [ ${#ports[@]} -lt 3 ]; do
  port=$(deploy_free_port)
  [[ " ${ports[*]} " == *" $port "* ]] || ports+=("$port")
done
grpc_port=${ports[0]} metrics_port=${ports[1]} health_port=${ports[2]}

# What the Secrets and the claim would hold: server1 (SAN 127.0.0.1) signed by ca1 as
# cert-manager's tls.crt/tls.key/ca.crt, a token file, a basic-auth user file, one gallery.
bash "$DEPLOY_ROOT/tests/security/make_certs.sh" "$WORK/certs"
vol="$WORK/volumes"
mkdir -p "$vol/tls" "$vol/auth" "$vol/metrics-auth" "$vol/galleries"
cp "$WORK/certs/server1.crt" "$vol/tls/tls.crt"
cp "$WORK/certs/server1.key" "$vol/tls/tls.key"
cp "$WORK/certs/ca1.crt" "$vol/tls/ca.crt"
token=$(openssl rand -hex 16)
printf '# simserve test tokens\n%s\n' "$token" >"$vol/auth/tokens"
password=$(openssl rand -hex 12)
printf 'prometheus:%s\n' "$password" >"$vol/metrics-auth/users"
"$VENV_PY" -c 'import sys, numpy as np
np.save(sys.argv[1], np.random.default_rng(6).standard_normal((40, 16)).astype(np.float32))' \
  "$vol/galleries/smoke.npy"
# A hostPath keeps the host's owner (root) and mode, and kube play applies no fsGroup to it:
# world-readable here, in a directory of this test only (the manifests' Secrets are 0440).
chmod 0755 "$WORK" "$vol" "$vol"/*
chmod 0644 "$vol"/*/*

image_name="${SIMSERVE_IMAGE%:*}"
image_tag="${SIMSERVE_IMAGE##*:}"
host_dir() { printf '%s: null\n          hostPath:\n            path: %s\n            type: Directory' "$1" "$2"; }
cat >"$WORK/overlay/podman.yaml" <<EOF
apiVersion: apps/v1
kind: Deployment
metadata:
  name: simserve
  namespace: simserve
spec:
  template:
    spec:
      hostNetwork: true
      containers:
        - name: simserve
          env:
            - name: SIMSERVE_LISTEN
              value: "127.0.0.1:$grpc_port"
            - name: SIMSERVE_METRICS_LISTEN
              value: "127.0.0.1:$metrics_port"
            - name: SIMSERVE_HEALTH_LISTEN
              value: "127.0.0.1:$health_port"
      volumes:
        - name: tls
          $(host_dir secret "$vol/tls")
        - name: tokens
          $(host_dir secret "$vol/auth")
        - name: metrics-auth
          $(host_dir secret "$vol/metrics-auth")
        - name: galleries
          $(host_dir persistentVolumeClaim "$vol/galleries")
EOF
deploy_play_render "$WORK" "$DEPLOY_ROOT/deploy/k8s/overlays/prod" "  - name: registry.example.com/simserve
    newName: $image_name
    newTag: \"$image_tag\""
grep -q 'secretName:\|claimName:' "$WORK/deployment.yaml" && die "a Secret or claim volume is left"

cleanup() { podman kube down "$WORK/deployment.yaml" >/dev/null 2>&1 || true; }
trap cleanup EXIT
log "podman kube play (prod overlay Deployment: TLS on 127.0.0.1:$grpc_port, health on :$health_port)"
deploy_play_start "$WORK/deployment.yaml" "$WORK/play.log"
ctr=$(deploy_kube_container simserve simserve)
log "container $ctr"

# What the pod spec must have turned into: the files the server reads where the env says.
env_dump=$(podman inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$ctr")
for want in SIMSERVE_TLS_CERT_FILE=/etc/simserve/tls/tls.crt SIMSERVE_TLS_KEY_FILE=/etc/simserve/tls/tls.key \
  SIMSERVE_AUTH_TOKEN_FILE=/etc/simserve/auth/tokens SIMSERVE_METRICS_TLS_CERT_FILE=/etc/simserve/tls/tls.crt \
  SIMSERVE_METRICS_BASIC_AUTH_FILE=/etc/simserve/metrics-auth/users OMP_NUM_THREADS=4; do
  grep -qx "$want" <<<"$env_dump" || die "container env lacks $want"
done
mounts=$(podman inspect --format '{{range .Mounts}}{{.Destination}} {{.RW}}{{println}}{{end}}' "$ctr")
for want in /etc/simserve/tls /etc/simserve/auth /etc/simserve/metrics-auth /var/lib/simserve/galleries; do
  grep -qx "$want false" <<<"$mounts" || die "no read-only mount at $want: $mounts"
done
[ "$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$ctr")" = "true" ] || die "root filesystem is writable"
log "pod: TLS, token and basic-auth files mounted read-only where the env points, read-only root"

"$VENV_PY" "$DEPLOY_ROOT/tests/deploy/smoke_client.py" --target "127.0.0.1:$grpc_port" \
  --tls-ca "$WORK/certs/ca1.crt" --token "$token" --health-target "127.0.0.1:$health_port" \
  --metrics-url "https://127.0.0.1:$metrics_port/metrics" --metrics-ca "$WORK/certs/ca1.crt" \
  --metrics-basic-auth "prometheus:$password" --expect-threads 4 \
  --gallery "smoke=$vol/galleries/smoke.npy" ||
  { podman logs "$ctr" 2>&1 | tail -30 >&2; die "the pod does not answer as configured"; }
startup=$(podman logs "$ctr" 2>&1 | grep -m1 'serving gRPC on' || true)
grep -q "plaintext health-only listener on 127.0.0.1:$health_port" <<<"$startup" ||
  die "the startup line names no health-only listener: $startup"
grep -qF "$token" <(podman logs "$ctr" 2>&1) && die "the server logged the token"

deploy_play_stop "$ctr" "$WORK/deployment.yaml"
trap - EXIT
log "kube_play_tls_test: PASS"
