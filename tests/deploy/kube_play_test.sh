#!/usr/bin/env bash
# Deploy test: runs the dev overlay's Deployment with `podman kube play` (its env incl.
# resourceFieldRef threads, limits, securityContext, emptyDir /tmp, and the gallery init
# container that copies the gallery image's .npy files into the emptyDir the server loads as
# --gallery_dir) and checks that the pod answers real calls, computes against the directory
# gallery, then stops it (SIGTERM, exit 0) and `podman kube down`s it.
# Test-only changes, made with a kustomize overlay on top of overlays/dev: the images are the
# locally built ones (the gallery image = the server image + one numpy-written .npy), and the
# pod uses the host network with the server bound to free loopback ports and no declared
# container ports (podman ignores Services and cannot map ports on the host network; this is
# how the test reaches the pod on 127.0.0.1 only).
# Usage: kube_play_test.sh [WORK_DIR]   (needs the image from image_test.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
WORK="${1:-$(mktemp -d)}"
rm -rf "$WORK" && mkdir -p "$WORK/overlay"
deploy_podman_env
podman image exists "$SIMSERVE_IMAGE" || die "$SIMSERVE_IMAGE missing: run image_test.sh first"

grpc_port=$(deploy_free_port)
metrics_port=$(deploy_free_port)
while [ "$metrics_port" = "$grpc_port" ]; do metrics_port=$(deploy_free_port); done
image_name="${SIMSERVE_IMAGE%:*}"
image_tag="${SIMSERVE_IMAGE##*:}"
# The gallery image of components/gallery-image: any image with /bin/sh, cp and mv and the
# files under /galleries; here the server image itself plus one file written by numpy.
gallery_image="${image_name}-galleries:$image_tag"
mkdir -p "$WORK/gallery"
"$VENV_PY" -c 'import sys, numpy as np
np.save(sys.argv[1], np.random.default_rng(5).standard_normal((2, 30, 24)).astype(np.float32))' \
  "$WORK/gallery/smoke.npy"
chmod 0644 "$WORK/gallery/smoke.npy"
printf 'FROM %s\nCOPY smoke.npy /galleries/smoke.npy\n' "$SIMSERVE_IMAGE" >"$WORK/gallery/Containerfile"
podman build --pull=never -q -t "$gallery_image" -f "$WORK/gallery/Containerfile" "$WORK/gallery" \
  >/dev/null || die "building $gallery_image failed"
cat >"$WORK/overlay/podman.yaml" <<EOF
apiVersion: apps/v1
kind: Deployment
metadata:
  name: simserve
  namespace: simserve-dev
  annotations:
    # podman 4.3 races removing a "once" init container that has just exited (fixed in
    # podman 4.6, containers/podman#18481); "always" keeps it, and its logs. (kube play reads
    # a Deployment's own annotations here, not its pod template's.)
    io.podman.annotations.init.container.type: always
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
EOF
deploy_play_render "$WORK" "$DEPLOY_ROOT/deploy/k8s/overlays/dev" "  - name: simserve
    newName: $image_name
    newTag: \"$image_tag\"
  - name: simserve-galleries
    newName: ${image_name}-galleries
    newTag: \"$image_tag\""
grep -q "image: $gallery_image" "$WORK/deployment.yaml" || die "gallery image override not applied"

cleanup() {
  podman kube down "$WORK/deployment.yaml" >/dev/null 2>&1 || true
  podman rmi "$gallery_image" >/dev/null 2>&1 || true
}
trap cleanup EXIT
log "podman kube play (dev overlay Deployment, gRPC on 127.0.0.1:$grpc_port)"
deploy_play_start "$WORK/deployment.yaml" "$WORK/play.log"
ctr=$(deploy_kube_container simserve simserve)
log "container $ctr"

# What the pod spec must have turned into.
env_dump=$(podman inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$ctr")
grep -qx 'OMP_NUM_THREADS=1' <<<"$env_dump" || die "OMP_NUM_THREADS not 1 (from limits.cpu): $(grep OMP <<<"$env_dump")"
grep -qx 'SIMSERVE_THREADS_PER_WORKER=1' <<<"$env_dump" || die "SIMSERVE_THREADS_PER_WORKER not derived from limits.cpu"
[ "$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$ctr")" = "true" ] || die "root filesystem is writable"
mounts=$(podman inspect --format '{{range .Mounts}}{{println .Destination}}{{end}}' "$ctr")
grep -qx /tmp <<<"$mounts" || die "no /tmp volume (emptyDir)"
grep -qx /var/lib/simserve/galleries <<<"$mounts" || die "no gallery volume at /var/lib/simserve/galleries"
# The init container ran first and copied the image's file (and the server must hold it as
# a directory gallery: smoke_client --gallery below).
init_ctr=$(deploy_kube_container simserve galleries)
# Captured first: `podman logs | grep -q` fails under pipefail when grep exits early (SIGPIPE).
init_log=$(podman logs "$init_ctr" 2>&1)
grep -q "copied 1 gallery file" <<<"$init_log" ||
  die "the gallery init container did not copy the file: $(tail -5 <<<"$init_log")"
host_pid=$(podman inspect --format '{{.State.Pid}}' "$ctr")
uid=$(awk '/^Uid:/ {print $2}' "/proc/$host_pid/status")
[ "$uid" = "65532" ] || die "runs as uid $uid, want 65532"
mem=$(podman inspect --format '{{.HostConfig.Memory}}' "$ctr")
[ "$mem" = "1073741824" ] || die "memory limit $mem, want 1Gi"
log "pod: OMP_NUM_THREADS=1 and threads from limits.cpu, read-only rootfs, /tmp emptyDir, uid 65532, 1Gi, gallery volume"

"$VENV_PY" "$DEPLOY_ROOT/tests/deploy/smoke_client.py" --target "127.0.0.1:$grpc_port" \
  --metrics-url "http://127.0.0.1:$metrics_port/metrics" --expect-threads 1 \
  --gallery "smoke=$WORK/gallery/smoke.npy" ||
  { podman logs "$ctr" | tail -30 >&2; die "the pod does not answer"; }

deploy_play_stop "$ctr" "$WORK/deployment.yaml"
podman rmi "$gallery_image" >/dev/null 2>&1 || true
trap - EXIT
log "kube_play_test: PASS"
