# shellcheck shell=bash
# Sourced by scripts/setup.sh (ROOT, VENV, SUDO set): tools of the observability and load
# suites. Debian: prometheus (promtool + the server for the scrape test) and nghttp2-client
# (h2load, the fallback load generator). Go: ghz, installed with `go install` into
# $SIMSERVE_TOOLS_DIR/go/bin (default ~/.cache/simserve/go/bin), where tests/load looks for it.
# Silent when everything is present.

SIMSERVE_TOOLS_DIR="${SIMSERVE_TOOLS_DIR:-$HOME/.cache/simserve}"
# The newest ghz the Go module proxy serves here; bump deliberately.
_ss_ghz="github.com/bojand/ghz/cmd/ghz@v0.93.0"

_ss_missing=()
for _ss_pkg in prometheus nghttp2-client; do
  dpkg-query -W -f='${Status}' "$_ss_pkg" 2>/dev/null | grep -q "install ok installed" ||
    _ss_missing+=("$_ss_pkg")
done
if [ ${#_ss_missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${_ss_missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null
  # The package's postinst may try to start a system Prometheus; the tests never use it.
  $SUDO apt-get install -y -qq --no-install-recommends "${_ss_missing[@]}" >/dev/null
fi

if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  export PATH="/usr/local/go/bin:$PATH"
fi
_ss_gopath="$SIMSERVE_TOOLS_DIR/go"
_ss_ver="${_ss_ghz##*@}"
if [ ! -x "$_ss_gopath/bin/ghz" ] || [ "$(cat "$_ss_gopath/bin/.ghz.version" 2>/dev/null)" != "$_ss_ver" ]; then
  if command -v go >/dev/null 2>&1; then
    echo "setup: go install $_ss_ghz"
    mkdir -p "$_ss_gopath/bin"
    if GOPATH="$_ss_gopath" GOMODCACHE="$_ss_gopath/pkg/mod" GOBIN="$_ss_gopath/bin" \
      GOFLAGS=-modcacherw go install "$_ss_ghz"; then
      echo "$_ss_ver" >"$_ss_gopath/bin/.ghz.version"
    else
      echo "setup: WARNING: go install ghz failed; tests/load cannot run" >&2
    fi
  else
    echo "setup: WARNING: no Go toolchain; ghz not installed; tests/load cannot run" >&2
  fi
fi
unset _ss_ghz _ss_missing _ss_pkg _ss_gopath _ss_ver
