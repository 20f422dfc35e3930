#!/usr/bin/env bash
# Deploy test: builds the simserve image with podman (--pull=never, local debian:bookworm
# base), checks what the image contains and how it is configured, runs it with a read-only
# root filesystem on loopback ports, makes real calls (tests/deploy/smoke_client.py), scrapes
# /metrics, then sends SIGTERM during a streamed call and checks that the call completes and
# the server exits cleanly (code 0) within the drain grace.
# Prints FIGURE lines: build time, image size, container start-to-exit, SIGTERM-to-exit.
# Usage: image_test.sh [--no-build]   (--no-build: use the already built image)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
deploy_podman_env

if [ "${1:-}" != "--no-build" ]; then
  deploy_build_image
fi
podman image exists "$SIMSERVE_IMAGE" || die "$SIMSERVE_IMAGE does not exist"

# 1. Static properties of the image.
cfg() { podman image inspect --format "$1" "$SIMSERVE_IMAGE"; }
[ "$(cfg '{{.Config.User}}')" = "65532:65532" ] || die "image user is '$(cfg '{{.Config.User}}')', want 65532:65532"
ports=$(cfg '{{json .Config.ExposedPorts}}')
grep -q '"50051/tcp"' <<<"$ports" || die "50051/tcp not exposed"
grep -q '"9464/tcp"' <<<"$ports" || die "9464/tcp not exposed"
[ "$(cfg '{{json .Config.Entrypoint}}')" = '["/usr/local/bin/simserve"]' ] ||
  die "entrypoint must be the server in exec form, got $(cfg '{{json .Config.Entrypoint}}')"
dev_files=$(podman run --rm --pull=never --network=none --entrypoint /bin/sh "$SIMSERVE_IMAGE" -c '
  for f in /usr/bin/gcc /usr/bin/g++ /usr/bin/cc /usr/bin/c++ /usr/bin/clang /usr/bin/cmake \
           /usr/bin/ld /usr/bin/protoc /usr/include/grpcpp /usr/include/dnnl.h \
           /usr/include/google/protobuf /usr/include/absl /usr/include/c++; do
    [ -e "$f" ] && echo "$f"; done; true')
[ -z "$dev_files" ] || die "runtime image contains build tools or headers: $dev_files"
log "image: user 65532:65532, exposes 50051+9464, exec-form entrypoint, no compilers/headers"

# 2. Run it read-only (no tmpfs either), unprivileged, on free loopback ports.
grpc_port=$(deploy_free_port)
metrics_port=$(deploy_free_port)
while [ "$metrics_port" = "$grpc_port" ]; do metrics_port=$(deploy_free_port); done
name="simserve-image-test-$$"
cleanup() { podman rm -f -t 0 "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT
t0=$SECONDS
podman run -d --name "$name" --pull=never --network=host --read-only --read-only-tmpfs=false \
  --cap-drop=ALL --security-opt=no-new-privileges \
  -e SIMSERVE_LISTEN="127.0.0.1:$grpc_port" -e SIMSERVE_METRICS_LISTEN="127.0.0.1:$metrics_port" \
  -e SIMSERVE_DRAIN_GRACE=5s "$SIMSERVE_IMAGE" >/dev/null || die "podman run failed"

# The server itself is PID 1 of the container and runs as uid 65532.
host_pid=$(podman inspect --format '{{.State.Pid}}' "$name")
[ "$(cat "/proc/$host_pid/comm")" = "simserve" ] || die "container init is $(cat "/proc/$host_pid/comm")"
ns_pid=$(awk '/^NSpid:/ {print $NF}' "/proc/$host_pid/status")
[ "$ns_pid" = "1" ] || die "simserve is PID $ns_pid in the container, want 1"
uid=$(awk '/^Uid:/ {print $2}' "/proc/$host_pid/status")
[ "$uid" = "65532" ] || die "simserve runs as uid $uid, want 65532"
log "container: simserve is PID 1, uid 65532, read-only rootfs"

# 3. The client's last check sends SIGTERM while a streamed call is in flight: the call must
# complete, then the server must exit 0 within its drain grace (5 s) plus a margin.
sigterm_stamp="$(mktemp)"
"$VENV_PY" "$DEPLOY_ROOT/tests/deploy/smoke_client.py" --target "127.0.0.1:$grpc_port" \
  --metrics-url "http://127.0.0.1:$metrics_port/metrics" \
  --sigterm-during-stream "date +%s%N >$sigterm_stamp && podman kill --signal TERM $name >/dev/null" ||
  { podman logs "$name" | tail -30 >&2; die "smoke client failed"; }
code=$(timeout 30 podman wait "$name") || { podman logs "$name" | tail -30 >&2; die "no exit within 30 s of SIGTERM"; }
ms=$((($(date +%s%N) - $(cat "$sigterm_stamp")) / 1000000))
rm -f "$sigterm_stamp"
echo "FIGURE container_start_to_exit_seconds=$((SECONDS - t0))"
echo "FIGURE sigterm_to_exit_ms=$ms (includes draining the call in flight)"
podman logs "$name" 2>&1 | tail -3
[ "$code" = "0" ] || die "exit code after SIGTERM is $code, want 0"
[ "$ms" -lt 15000 ] || die "exit took $ms ms, more than drain grace 5 s + 10 s"
log "image_test: PASS"
