# shellcheck shell=bash
# Sourced by scripts/setup.sh (ROOT, VENV, SUDO set): the libFuzzer runtime for the fuzz
# preset (fuzz/, scripts/fuzz.sh). clang-14 and libomp-14-dev come from setup.sh itself;
# libclang-rt-14-dev adds libFuzzer and the ASan/UBSan runtimes. Silent when present.

if ! dpkg-query -W -f='${Status}' libclang-rt-14-dev 2>/dev/null | grep -q "install ok installed"; then
  echo "setup: installing the fuzzing runtime: libclang-rt-14-dev"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null
  $SUDO apt-get install -y -qq --no-install-recommends libclang-rt-14-dev >/dev/null 2>&1 ||
    $SUDO apt-get install -y -q --no-install-recommends libclang-rt-14-dev  # loudly on failure
fi
