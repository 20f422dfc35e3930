# shellcheck shell=bash
# Sourced by scripts/setup.sh (ROOT, VENV, SUDO set): tools of the deploy tests (tests/deploy):
# podman + buildah with runc and debootstrap (image build without a Docker engine), kustomize
# (kubectl's, or `go install`ed when kubectl is absent), the Go modules of the manifest
# validator and KServe's module (its CRD schemas). Silent when everything is present.

_sd_apt=(podman buildah runc catatonit debootstrap uidmap containernetworking-plugins)
_sd_missing=()
for _sd_pkg in "${_sd_apt[@]}"; do
  dpkg-query -W -f='${Status}' "$_sd_pkg" 2>/dev/null | grep -q "install ok installed" ||
    _sd_missing+=("$_sd_pkg")
done
if [ ${#_sd_missing[@]} -gt 0 ]; then
  echo "setup: installing deploy test tools: ${_sd_missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null
  $SUDO apt-get install -y -qq --no-install-recommends "${_sd_missing[@]}" >/dev/null
fi

if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  export PATH="/usr/local/go/bin:$PATH"
fi
if command -v go >/dev/null 2>&1; then
  # kustomize: kubectl's built-in one is used when present (the machine image ships kubectl).
  _sd_gobin="${SIMSERVE_TOOLS_DIR:-$HOME/.cache/simserve}/go/bin"
  if ! command -v kubectl >/dev/null 2>&1 && ! command -v kustomize >/dev/null 2>&1 &&
     [ ! -x "$_sd_gobin/kustomize" ]; then
    echo "setup: go install kustomize into $_sd_gobin"
    GOBIN="$_sd_gobin" go install sigs.k8s.io/kustomize/kustomize/v5@v5.8.1
  fi
  # Validator modules (k8s.io/api, prometheus-operator and cert-manager types): fetched once,
  # then offline. The check needs every imported package's source (not just go.mod files), so
  # a module added to go.mod is fetched here, not by the test.
  if ! (cd "$ROOT/tests/deploy/validate" && GOPROXY=off go list -deps . >/dev/null 2>&1); then
    echo "setup: downloading Go modules of tests/deploy/validate"
    (cd "$ROOT/tests/deploy/validate" && go mod download)
  fi
  # KServe's CRDs for the deploy/kserve check: its module source (one zip), version and hash
  # pinned in tests/deploy/lib.sh.
  _sd_kserve=$(sed -n 's/^KSERVE_VERSION="\(.*\)"$/\1/p' "$ROOT/tests/deploy/lib.sh")
  if ! (cd / && GOPROXY=off GOFLAGS=-mod=mod go mod download "github.com/kserve/kserve@$_sd_kserve" >/dev/null 2>&1); then
    echo "setup: downloading the KServe $_sd_kserve module (its CRDs)"
    (cd / && GOFLAGS=-mod=mod go mod download "github.com/kserve/kserve@$_sd_kserve")
  fi
else
  echo "setup: WARNING: no Go toolchain; the deploy manifest tests will fail" >&2
fi
unset _sd_apt _sd_missing _sd_pkg _sd_gobin _sd_kserve
