# shellcheck shell=bash
# Sourced by scripts/setup.sh (ROOT, VENV, SUDO set): the Open Inference Protocol (KServe v2)
# test venv, $ROOT/.venv-kserve, with Triton's own Python client (tests/kserve/). A separate
# venv because tritonclient pins its own protobuf/grpcio range; the main .venv is untouched. This
# script does not install the simserve Python client (tests/kserve must not need it);
# 46-python-compat.sh adds it afterwards for the one-venv tests (tests/python).
# Also downloads the Go modules of tests/kserve/go (go.sum-pinned, like tests/interop/go).
# Silent when everything is present (stamps: the pinned package list, the go.sum hash); one
# "setup: ..." line per install.

_ss_kserve_venv="$ROOT/.venv-kserve"
# Pinned: the versions tests/kserve was written and run against. grpcio-health-checking is for
# tests/interop/serverctl.py's readiness wait; 1.81.1 is the newest that accepts protobuf < 7
# (tritonclient's pin; newer ones would pull protobuf 7 and break tritonclient).
_ss_kserve_pkgs=("tritonclient[grpc]==2.73.0" "grpcio-health-checking==1.81.1" "protobuf<7"
  numpy scikit-learn pytest)
_ss_kserve_stamp="$_ss_kserve_venv/.simserve-packages"
if [ ! -x "$_ss_kserve_venv/bin/python" ]; then
  echo "setup: creating the KServe test venv at $_ss_kserve_venv"
  python3 -m venv "$_ss_kserve_venv"
  rm -f "$_ss_kserve_stamp"
fi
if [ "$(cat "$_ss_kserve_stamp" 2>/dev/null)" != "${_ss_kserve_pkgs[*]}" ] ||
   ! "$_ss_kserve_venv/bin/python" -c \
     'import tritonclient.grpc, tritonclient.utils.shared_memory, grpc_health, sklearn, pytest' \
     2>/dev/null; then
  echo "setup: installing ${_ss_kserve_pkgs[*]} into $_ss_kserve_venv"
  "$_ss_kserve_venv/bin/python" -m pip install -q --disable-pip-version-check \
    "${_ss_kserve_pkgs[@]}" >/dev/null
  echo "${_ss_kserve_pkgs[*]}" >"$_ss_kserve_stamp"
fi

# The Go client of tests/kserve/go: its modules, pinned by its go.sum, into the module cache
# that 40-python-interop.sh set up (Go itself and the protoc plugins come from there).
_ss_kserve_gopath="${SIMSERVE_TOOLS_DIR:-$HOME/.cache/simserve}/go"
_ss_kserve_gosum="$(sha256sum "$ROOT/tests/kserve/go/go.sum" | cut -d' ' -f1)"
if [ "$(cat "$_ss_kserve_gopath/.kserve-go-sum" 2>/dev/null)" != "$_ss_kserve_gosum" ]; then
  echo "setup: go mod download (tests/kserve/go)"
  mkdir -p "$_ss_kserve_gopath"
  (cd "$ROOT/tests/kserve/go" && GOPATH="$_ss_kserve_gopath" \
    GOMODCACHE="$_ss_kserve_gopath/pkg/mod" GOFLAGS=-modcacherw go mod download)
  echo "$_ss_kserve_gosum" >"$_ss_kserve_gopath/.kserve-go-sum"
fi
unset _ss_kserve_venv _ss_kserve_pkgs _ss_kserve_stamp _ss_kserve_gopath _ss_kserve_gosum
