# shellcheck shell=bash
# Sourced by scripts/setup.sh (ROOT, VENV, SUDO set), after 40-python-interop.sh (the client's
# build requirements in $VENV) and 45-kserve.sh (which creates $ROOT/.venv-kserve): the Python
# client on the other ends of its protobuf / grpcio range (client/python/README.md), for the
# CTest tests python_client_protobuf_min, python_client_with_tritonclient and
# python_tritonclient_one_process (tests/python/CMakeLists.txt). $VENV is the newest end.
#   $ROOT/.venv-pb-min  the LOW end: protobuf / grpcio pinned to the stated minimum, the tools
#                       the suite needs, and grpcio-tools of that era (test_packaging builds
#                       the wheel with it: an old protoc's descriptor set);
#   $ROOT/.venv-kserve  tritonclient's venv (owned by 45-kserve.sh, left as it is when missing):
#                       the client and grpcio-reflection (test_auth) go in next to it, with its
#                       protobuf / grpcio held where tritonclient put them.
# The client goes in NON-editable, as a wheel built with $VENV's grpcio-tools from a copy of
# client/python: the checkout's generated files (which $VENV's editable install uses) are not
# touched. Stamps: the pin list, the sha256 of the client's sources + proto. Silent when up to
# date; one "setup: ..." line per install.

_ss_pbmin="$ROOT/.venv-pb-min"
_ss_kserve="$ROOT/.venv-kserve"
# The LOW end: keep in step with client/python/pyproject.toml (dependencies) and README.md.
# grpcio-health-checking is for tests/interop/serverctl.py, grpcio-reflection for test_auth;
# setuptools: >= 70.1 builds wheels without the `wheel` package, and 75.8 still has the
# pkg_resources that grpcio-tools 1.51 imports (the newest setuptools dropped it).
_ss_pbmin_pkgs=("protobuf==4.21.6" "grpcio==1.51.1" "grpcio-tools==1.51.1"
  "grpcio-health-checking==1.51.1" "grpcio-reflection==1.51.1" "setuptools==75.8.0"
  numpy scikit-learn pytest)
_ss_client_sha="$(cd "$ROOT" && {
  find client/python/pyproject.toml client/python/setup.py client/python/src -type f \
    \( -name '*.py' -o -name '*.toml' -o -name py.typed \) -not -path '*/__pycache__/*' \
    -not -path '*.egg-info/*' | LC_ALL=C sort | xargs sha256sum
  sha256sum proto/simserve/v1/similarity.proto; } | sha256sum | cut -d' ' -f1)"
_ss_whl=""

_ss_build_client_wheel() {  # once per run: the wheel into a temp dir, its path in _ss_whl
  [ -n "$_ss_whl" ] && return 0
  _ss_whl_dir="$(mktemp -d)"
  mkdir "$_ss_whl_dir/python"
  (cd "$ROOT/client/python" && tar -cf - --exclude=./build --exclude=./dist \
      --exclude='*.egg-info' --exclude=__pycache__ --exclude='src/simserve/v1/similarity.binpb' \
      --exclude='src/simserve/v1/*.pyi' --exclude='src/simserve/v1/similarity.proto' \
      --exclude='src/simserve/v1/.proto-sha256' .) | tar -xf - -C "$_ss_whl_dir/python"
  SIMSERVE_PROTO_DIR="$ROOT/proto" "$VENV/bin/python" -m pip wheel -q --no-deps \
    --no-build-isolation --disable-pip-version-check -w "$_ss_whl_dir" "$_ss_whl_dir/python" \
    >/dev/null
  _ss_whl="$(ls "$_ss_whl_dir"/simserve-*.whl)"
}

# Installs the client's wheel (and `extra` packages) into the venv $1 unless its stamp is current,
# holding the venv's protobuf / grpcio where they are (a constraint file): a dependency range
# that excluded them fails here instead of upgrading them. Usage: _ss_install_client VENV EXTRA...
_ss_install_client() {
  local target="$1" stamp="$1/.simserve-client"
  shift
  if [ "$(cat "$stamp" 2>/dev/null)" = "$_ss_client_sha $*" ] &&
     (cd / && "$target/bin/python" -c 'import simserve.v1.similarity_pb2_grpc' 2>/dev/null); then
    return 0
  fi
  echo "setup: installing the simserve Python client (wheel) ${*:+and $* }into $target"
  _ss_build_client_wheel
  "$target/bin/python" -m pip freeze --disable-pip-version-check |
    { grep -iE '^(protobuf|grpcio)==' || true; } >"$_ss_whl_dir/constraints.txt"
  "$target/bin/python" -m pip install -q --disable-pip-version-check \
    -c "$_ss_whl_dir/constraints.txt" "$_ss_whl" "$@" >/dev/null
  # Same version number as an installed older build: replace it.
  "$target/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps \
    "$_ss_whl" >/dev/null
  echo "$_ss_client_sha $*" >"$stamp"
}

# 1. The low-end venv.
if [ "$(cat "$_ss_pbmin/.simserve-packages" 2>/dev/null)" != "${_ss_pbmin_pkgs[*]}" ] ||
   ! "$_ss_pbmin/bin/python" -c 'import grpc_tools, grpc_health, sklearn, pytest' 2>/dev/null
then
  echo "setup: installing ${_ss_pbmin_pkgs[*]} into $_ss_pbmin"
  [ -x "$_ss_pbmin/bin/python" ] || python3 -m venv "$_ss_pbmin"
  "$_ss_pbmin/bin/python" -m pip install -q --disable-pip-version-check "${_ss_pbmin_pkgs[@]}" \
    >/dev/null
  echo "${_ss_pbmin_pkgs[*]}" >"$_ss_pbmin/.simserve-packages"
fi
_ss_install_client "$_ss_pbmin"

# 2. Next to tritonclient (only when 45-kserve.sh made that venv).
if [ -x "$_ss_kserve/bin/python" ]; then
  _ss_install_client "$_ss_kserve" grpcio-reflection
fi

[ -n "$_ss_whl" ] && rm -rf "$_ss_whl_dir"
unset -f _ss_build_client_wheel _ss_install_client
unset _ss_pbmin _ss_kserve _ss_pbmin_pkgs _ss_client_sha _ss_whl _ss_whl_dir
