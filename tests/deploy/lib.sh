# Shared helpers for the deploy tests (sourced, not executed): podman configuration, the
# locally built debian:bookworm base image, the simserve image build, free loopback ports,
# kustomize, the manifest validator and the names `podman kube play` gives containers.
# Caches live in SIMSERVE_DEPLOY_CACHE (default /var/cache/simserve-deploy) and in podman's own
# storage, so a rerun skips debootstrap and reuses image layers.

DEPLOY_ROOT="${DEPLOY_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
DEPLOY_CACHE="${SIMSERVE_DEPLOY_CACHE:-/var/cache/simserve-deploy}"
BASE_IMAGE="docker.io/library/debian:bookworm"
SIMSERVE_IMAGE="${SIMSERVE_IMAGE:-localhost/simserve:test}"
VENV_PY="${SIMSERVE_VENV:-$DEPLOY_ROOT/.venv}/bin/python"

log() { echo "[deploy $(date +%H:%M:%S)] $*"; }
die() { echo "[deploy] FAIL: $*" >&2; exit 1; }

# Writes the containers.conf recipe from DESIGN.md (runc, explicit ulimits) and exports it.
deploy_podman_env() {
  mkdir -p "$DEPLOY_CACHE"
  local conf="$DEPLOY_CACHE/containers.conf"
  local want
  want=$(printf '%s\n' '[containers]' \
    'default_ulimits = ["nofile=20000:20000","nproc=8192:8192"]' \
    '[engine]' 'runtime = "runc"')
  if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$want" ]; then
    printf '%s\n' "$want" >"$conf"
  fi
  export CONTAINERS_CONF="$conf"
  command -v podman >/dev/null || die "podman is not installed (run scripts/setup.sh)"
}

# The Debian mirror the host uses (deb822 or one-line sources), default deb.debian.org.
deploy_debian_mirror() {
  local uri
  uri=$(grep -hoE 'https?://[^ ]+/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
  if [ -z "$uri" ]; then
    uri=$(grep -hoE '^deb +https?://[^ ]+/debian/? +bookworm' /etc/apt/sources.list \
      /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $2}' | head -1)
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

# Makes docker.io/library/debian:bookworm exist in podman storage: reuse it if present, else
# import the cached rootfs tarball, else debootstrap one (minbase) and cache the tarball.
deploy_ensure_base_image() {
  if podman image exists "$BASE_IMAGE"; then
    return 0
  fi
  local tarball="$DEPLOY_CACHE/debian-bookworm-minbase.tar"
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || die "debootstrap is not installed (run scripts/setup.sh)"
    local rootfs="$DEPLOY_CACHE/rootfs.tmp"
    rm -rf "$rootfs"
    local mirror
    mirror=$(deploy_debian_mirror)
    log "debootstrap --variant=minbase bookworm from $mirror (one-time, cached)"
    local t0=$SECONDS
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$DEPLOY_CACHE/debootstrap.log" 2>&1 ||
      { tail -20 "$DEPLOY_CACHE/debootstrap.log" >&2; die "debootstrap failed"; }
    # Same apt sources and trimming as the official image (updates + security suites, no
    # apt lists or caches in the base layer).
    rm -f "$rootfs/etc/apt/sources.list"
    printf 'Types: deb\nURIs: %s\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: %s\n\nTypes: deb\nURIs: %s\nSuites: bookworm-security\nComponents: main\nSigned-By: %s\n' \
      "$mirror" /usr/share/keyrings/debian-archive-keyring.gpg "${mirror%/debian*}/debian-security" \
      /usr/share/keyrings/debian-archive-keyring.gpg >"$rootfs/etc/apt/sources.list.d/debian.sources"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar --numeric-owner -C "$rootfs" -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
    rm -rf "$rootfs"
    log "debootstrap done in $((SECONDS - t0)) s"
  fi
  log "importing $tarball as $BASE_IMAGE"
  podman import -q --change 'CMD ["bash"]' "$tarball" "$BASE_IMAGE" >/dev/null ||
    die "podman import failed"
}

# Builds the simserve image from the repository's Dockerfile (layers cached by podman).
# The build stage is tagged too, so its layers stay cached, and the images this replaces are
# removed (only ours: no machine-wide prune). Prints build time and image size.
deploy_build_image() {
  deploy_ensure_base_image
  local build_tag="${SIMSERVE_IMAGE%:*}-build:cache"
  local old_ids
  old_ids=$(for ref in "$SIMSERVE_IMAGE" "$build_tag"; do
    podman image inspect --format '{{.Id}}' "$ref" 2>/dev/null || true; done)
  log "building $SIMSERVE_IMAGE (podman build --pull=never --layers)"
  local t0=$SECONDS
  podman build --pull=never --layers -t "$SIMSERVE_IMAGE" -f "$DEPLOY_ROOT/Dockerfile" \
    "$DEPLOY_ROOT" >"$DEPLOY_CACHE/build.log" 2>&1 ||
    { tail -60 "$DEPLOY_CACHE/build.log" >&2; die "podman build failed (log: $DEPLOY_CACHE/build.log)"; }
  local secs=$((SECONDS - t0))
  # The build stage's image is the last "--> ID" line before the runtime stage starts.
  local stage_id
  stage_id=$(awk '/^\[2\/2\] STEP 1\// {print id; exit} /^--> [0-9a-f]+$/ {id = $2}' \
    "$DEPLOY_CACHE/build.log")
  [ -n "$stage_id" ] && podman tag "$stage_id" "$build_tag" || die "cannot tag the build stage"
  local new_ids id
  new_ids=$(podman image inspect --format '{{.Id}}' "$SIMSERVE_IMAGE" "$build_tag")
  for id in $old_ids; do
    grep -q "$id" <<<"$new_ids" || podman rmi "$id" >/dev/null 2>&1 || true
  done
  local size
  size=$(podman image inspect --format '{{.Size}}' "$SIMSERVE_IMAGE")
  echo "FIGURE image_build_seconds=$secs (layer cache: $(grep -c 'Using cache' "$DEPLOY_CACHE/build.log") steps reused)"
  echo "FIGURE image_size_bytes=$size ($((size / 1024 / 1024)) MiB)"
}

# Prints a free TCP port on 127.0.0.1 (bind to port 0, read it back, release it).
deploy_free_port() {
  "$VENV_PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Puts the Go toolchain on PATH (setup installs it in /usr/local/go).
deploy_go_env() {
  if ! command -v go >/dev/null && [ -x /usr/local/go/bin/go ]; then export PATH="/usr/local/go/bin:$PATH"; fi
  command -v go >/dev/null || die "go is required (run scripts/setup.sh)"
}

# Renders a kustomization directory to stdout: kubectl's kustomize, else kustomize (on PATH or
# `go install`ed by setup).
deploy_kustomize() {
  local gobin="${SIMSERVE_TOOLS_DIR:-$HOME/.cache/simserve}/go/bin"
  if command -v kubectl >/dev/null; then kubectl kustomize "$1"
  elif command -v kustomize >/dev/null; then kustomize build "$1"
  elif [ -x "$gobin/kustomize" ]; then "$gobin/kustomize" build "$1"
  else die "neither kubectl nor kustomize found (run scripts/setup.sh)"; fi
}

# KServe's CRDs, from its Go module source (KServe's Go API types cannot be built with the
# validator's k8s.io version: deploy/README.md, "KServe"). The module zip is fetched by
# scripts/setup.d/60-deploy.sh and checked against the pinned hash here.
KSERVE_MODULE="github.com/kserve/kserve"
KSERVE_VERSION="v0.20.0"
KSERVE_SUM="h1:Bs7HxmGV4KFqqptDcWseKv+mwD4YOYHJWcuVgPG2Gug="
KSERVE_CRDS=(serving.kserve.io_servingruntimes.yaml serving.kserve.io_clusterservingruntimes.yaml
  serving.kserve.io_inferenceservices.yaml)

# Prints the validator flags -crd FILE for KServe's CRDs (module cache only, no network).
deploy_kserve_crd_flags() {
  deploy_go_env
  local info dir sum f
  info=$(cd / && GOPROXY=off GOFLAGS=-mod=mod go mod download -json "$KSERVE_MODULE@$KSERVE_VERSION" 2>&1) ||
    die "$KSERVE_MODULE@$KSERVE_VERSION is not in the Go module cache (run scripts/setup.sh): $info"
  dir=$(sed -n 's/^\t"Dir": "\(.*\)",$/\1/p' <<<"$info")
  sum=$(sed -n 's/^\t"Sum": "\(.*\)",$/\1/p' <<<"$info")
  [ "$sum" = "$KSERVE_SUM" ] || die "$KSERVE_MODULE@$KSERVE_VERSION: module hash $sum, want $KSERVE_SUM"
  for f in "${KSERVE_CRDS[@]}"; do
    [ -f "$dir/config/crd/full/$f" ] || die "no $f in $dir/config/crd/full"
    printf -- '-crd %s ' "$dir/config/crd/full/$f"
  done
}

# Builds the manifest validator (tests/deploy/validate) into the file given.
deploy_build_validator() {
  deploy_go_env
  (cd "$DEPLOY_ROOT/tests/deploy/validate" && go build -o "$1" .) || die "validator build failed"
}

# Prints the name of container CONTAINER of the pod that `podman kube play` made for the
# Deployment DEPLOYMENT (<deployment>-pod-<n>-<container>), or dies.
deploy_kube_container() {
  local name
  name=$(podman ps -a --format '{{.Names}}' | grep -E "^$1-pod-[0-9]+-$2\$" | head -1 || true)
  [ -n "$name" ] || { podman ps -a >&2; die "no container $2 of $1 from kube play"; }
  echo "$name"
}

# Writes WORK/overlay/kustomization.yaml for `podman kube play`: the overlay OVERLAY_DIR with
# the image overrides IMAGES (YAML list items), the caller's WORK/overlay/podman.yaml patch,
# and no declared container ports (with the host network podman rejects port mappings; the
# ports are only declarative there). Then renders it, validates it (schema only: the test
# patch changes what the policy checks, k8s_test.sh checks the real overlay) and writes the
# Deployment to WORK/deployment.yaml.
deploy_play_render() {
  local work="$1" overlay="$2" images="$3"
  cat >"$work/overlay/kustomization.yaml" <<EOT
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $(realpath --relative-to="$work/overlay" "$overlay")
images:
$images
patches:
  - path: podman.yaml
  - target:
      kind: Deployment
      name: simserve
    patch: |-
      - op: remove
        path: /spec/template/spec/containers/0/ports
EOT
  deploy_kustomize "$work/overlay" >"$work/rendered.yaml"
  deploy_build_validator "$work/validate"
  "$work/validate" -schema-only -extract-kind Deployment "$work/rendered.yaml" \
    >"$work/deployment.yaml" || die "the patched overlay $(basename "$overlay") does not validate"
  grep -q "image: $SIMSERVE_IMAGE" "$work/deployment.yaml" || die "image override not applied"
}

# Starts the Deployment file with `podman kube play` (removing leftovers of an interrupted
# run first, which would make it fail on the name); its output goes to LOG.
deploy_play_start() {
  podman kube down "$1" >/dev/null 2>&1 || true
  podman kube play --start "$1" >"$2" 2>&1 || { cat "$2" >&2; die "podman kube play failed"; }
}

# Stops the pod of container CTR as the kubelet would (SIGTERM, 35 s grace), checks that the
# server exited 0, then `kube down`s the Deployment file and checks the pod is gone.
deploy_play_stop() {
  local ctr="$1" deployment="$2" pod code
  pod=$(podman inspect --format '{{.Pod}}' "$ctr")
  podman pod stop -t 35 "$pod" >/dev/null
  code=$(podman inspect --format '{{.State.ExitCode}}' "$ctr")
  podman logs "$ctr" 2>&1 | tail -2
  [ "$code" = "0" ] || die "container exit code $code after stop, want 0"
  podman kube down "$deployment" >/dev/null
  if podman pod exists "$pod"; then die "pod still exists after kube down"; fi
}
