#!/usr/bin/env bash
# Installs everything simserve needs on Debian 12, idempotently and quietly.
# Re-running it when all is present does nothing visible and takes about a second.
set -euo pipefail

APT_PACKAGES=(
  build-essential cmake ninja-build pkg-config git
  clang-format clang-tidy clang-14 libomp-14-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libdnnl-dev ocl-icd-opencl-dev opencl-headers libabsl-dev prometheus-cpp-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  python3 python3-venv python3-pip
  openssl
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${#missing[@]} Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null
  # debconf's "delaying package configuration" notice on stderr is noise, not an error.
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"  # rerun loudly on failure
fi

# Python tooling for the benchmark comparison and tests lives in a project venv.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SIMSERVE_VENV:-$ROOT/.venv}"
PY_PACKAGES=(numpy scikit-learn grpcio grpcio-tools grpcio-health-checking grpcio-reflection protobuf
  faiss-cpu)
# SIMSERVE_SETUP_VENV=0 skips the venv (the Dockerfile build stage needs no Python tooling).
if [ "${SIMSERVE_SETUP_VENV:-1}" != 0 ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating Python venv at $VENV"
    python3 -m venv "$VENV"
  fi
  if ! "$VENV/bin/python" -c 'import numpy, sklearn, grpc, grpc_tools, grpc_health, grpc_reflection, faiss' 2>/dev/null; then
    echo "setup: installing Python packages: ${PY_PACKAGES[*]}"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
  fi
fi

# Each area adds its own idempotent, quiet installer (Go tools, Node packages, podman, ...).
for part in "$ROOT"/scripts/setup.d/*.sh; do
  [ -e "$part" ] || continue
  # shellcheck source=/dev/null
  source "$part"
done
