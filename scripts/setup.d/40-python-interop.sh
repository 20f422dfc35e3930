# shellcheck shell=bash
# Sourced by scripts/setup.sh (ROOT, VENV, SUDO set): installs the Python client package
# (editable) into the venv and the interop tools (Go protoc plugins + grpcurl, Node grpc-js).
# Tool caches live in stable places outside the checkout so reruns are quick and offline:
#   SIMSERVE_TOOLS_DIR (default ~/.cache/simserve): go/ (GOPATH, GOMODCACHE, bin/), node/.
# Silent when everything is present.

SIMSERVE_TOOLS_DIR="${SIMSERVE_TOOLS_DIR:-$HOME/.cache/simserve}"
_ss_gopath="$SIMSERVE_TOOLS_DIR/go"
_ss_node="$SIMSERVE_TOOLS_DIR/node"
# Pinned versions (served by the Go module proxy / npm); bump together with
# tests/interop/go/go.mod and go.sum.
_ss_protoc_gen_go="google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12"
_ss_protoc_gen_go_grpc="google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2"
_ss_grpcurl="github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4"
_ss_node_pkgs=("@grpc/grpc-js@1.14.7" "@grpc/proto-loader@0.8.1")

# 1. The Python client, editable, rebuilt when the proto changed (stamp = proto sha256) or it
#    does not import (e.g. a tree built before the descriptor-set loaders: no similarity.binpb).
_ss_proto_sha="$(sha256sum "$ROOT/proto/simserve/v1/similarity.proto" | cut -d' ' -f1)"
_ss_stamp="$ROOT/client/python/src/simserve/v1/.proto-sha256"
if [ "$(cat "$_ss_stamp" 2>/dev/null)" != "$_ss_proto_sha" ] ||
   ! (cd / && "$VENV/bin/python" - "$ROOT" <<'PYEOF' 2>/dev/null
import os, sys, simserve, simserve.v1.similarity_pb2_grpc
want = os.path.realpath(os.path.join(sys.argv[1], "client", "python", "src"))
sys.exit(0 if os.path.realpath(simserve.__file__).startswith(want) else 1)
PYEOF
   ); then
  echo "setup: installing the simserve Python client (editable) into $VENV"
  # Build requirements (pyproject.toml) from the venv itself (offline, no isolated build env);
  # any grpcio-tools does: only its protoc is used, for the version-independent descriptor set.
  # setuptools >= 70.1 builds editable wheels without the separate `wheel` package.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    "setuptools>=70.1" grpcio-tools >/dev/null
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    --no-build-isolation -e "$ROOT/client/python" >/dev/null
fi
if ! "$VENV/bin/python" -c 'import pytest' 2>/dev/null; then
  echo "setup: installing pytest into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check pytest
fi

# 2. Go toolchain (preinstalled on this machine kind; Debian's golang-go as a fallback).
if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  export PATH="/usr/local/go/bin:$PATH"
fi
if ! command -v go >/dev/null 2>&1; then
  echo "setup: installing Go (Debian golang-go)"
  $SUDO apt-get update -qq >/dev/null
  $SUDO apt-get install -y -qq --no-install-recommends golang-go >/dev/null
fi
mkdir -p "$_ss_gopath/bin"
for _ss_tool in "$_ss_protoc_gen_go" "$_ss_protoc_gen_go_grpc" "$_ss_grpcurl"; do
  _ss_name="${_ss_tool%@*}"; _ss_name="${_ss_name##*/}"
  _ss_ver="${_ss_tool##*@}"
  if [ ! -x "$_ss_gopath/bin/$_ss_name" ] ||
     [ "$(cat "$_ss_gopath/bin/.$_ss_name.version" 2>/dev/null)" != "$_ss_ver" ]; then
    echo "setup: go install $_ss_tool"
    GOPATH="$_ss_gopath" GOMODCACHE="$_ss_gopath/pkg/mod" GOBIN="$_ss_gopath/bin" \
      GOFLAGS=-modcacherw go install "$_ss_tool"
    echo "$_ss_ver" >"$_ss_gopath/bin/.$_ss_name.version"
  fi
done
# The interop Go client's dependencies, pinned by tests/interop/go/go.sum.
_ss_gosum_sha="$(sha256sum "$ROOT/tests/interop/go/go.sum" | cut -d' ' -f1)"
if [ "$(cat "$_ss_gopath/.interop-go-sum" 2>/dev/null)" != "$_ss_gosum_sha" ]; then
  echo "setup: go mod download (tests/interop/go)"
  (cd "$ROOT/tests/interop/go" && GOPATH="$_ss_gopath" GOMODCACHE="$_ss_gopath/pkg/mod" \
    GOFLAGS=-modcacherw go mod download)
  echo "$_ss_gosum_sha" >"$_ss_gopath/.interop-go-sum"
fi

# 3. Node packages for the interop Node client (resolved through NODE_PATH at test time).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "setup: installing Node.js (Debian nodejs npm)"
  $SUDO apt-get update -qq >/dev/null
  $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
if [ "$(cat "$_ss_node/.versions" 2>/dev/null)" != "${_ss_node_pkgs[*]}" ]; then
  echo "setup: npm install ${_ss_node_pkgs[*]} into $_ss_node"
  mkdir -p "$_ss_node"
  [ -f "$_ss_node/package.json" ] ||
    echo '{"name":"simserve-interop-tools","private":true}' >"$_ss_node/package.json"
  (cd "$_ss_node" && npm install --silent --no-audit --no-fund "${_ss_node_pkgs[@]}" >/dev/null)
  echo "${_ss_node_pkgs[*]}" >"$_ss_node/.versions"
fi
unset _ss_gopath _ss_node _ss_protoc_gen_go _ss_protoc_gen_go_grpc _ss_grpcurl _ss_node_pkgs \
  _ss_proto_sha _ss_stamp _ss_tool _ss_name _ss_ver _ss_gosum_sha
