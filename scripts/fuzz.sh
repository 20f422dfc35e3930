#!/usr/bin/env bash
# Builds the libFuzzer harnesses (CMake preset `fuzz`: clang-14, ASan + UBSan; build/fuzz)
# incrementally and runs them (fuzz/README.md).
#   --ci    (default) per harness: replay fuzz/regressions/<harness>/, then fuzz for
#           FUZZ_SECONDS (60) from a scratch copy of fuzz/corpus/<harness>/. The CTest test
#           `fuzz` (label fuzz) runs this from scripts/test.sh.
#   --long  per harness: FUZZ_RUNS (10000000) executions, or FUZZ_LONG_SECONDS if set and
#           reached first; the corpus grows in build/fuzz/long/corpus/<harness>/ across runs.
# Any crash, sanitizer report, leak, timeout (FUZZ_TIMEOUT s per input, 25) or out-of-memory
# fails the run with the reproducer's path; every harness runs anyway. Trailing arguments
# pick harnesses (default: all). Prints one line per step with its time and a summary table
# (Markdown; --long also writes it to build/fuzz/long/results.md).
# Usage: scripts/fuzz.sh [--ci|--long] [harness...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE=ci
case "${1:-}" in
  --ci) shift ;;
  --long) MODE=long; shift ;;
  -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
esac
ALL=(compute_request_fuzzer upload_fuzzer npy_fuzzer gallery_fuzzer)
if [ $# -gt 0 ]; then HARNESSES=("$@"); else HARNESSES=("${ALL[@]}"); fi
# Largest input per harness (bytes): room for a few tensors or messages, small enough to stay fast.
declare -A MAX_LEN=([compute_request_fuzzer]=8192 [upload_fuzzer]=16384 [npy_fuzzer]=4096
                    [gallery_fuzzer]=16384)
BUILD="$ROOT/build/fuzz"
WORK="$BUILD/$MODE"
start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - start )) s"; }

for tool in clang++-14 cmake; do
  command -v "$tool" >/dev/null || { echo "fuzz: $tool missing (run scripts/setup.sh)" >&2; exit 1; }
done
[ -e /usr/lib/llvm-14/lib/clang/14.0.6/lib/linux/libclang_rt.fuzzer-x86_64.a ] ||
  ls /usr/lib/llvm-14/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1 ||
  { echo "fuzz: libFuzzer missing: libclang-rt-14-dev (run scripts/setup.sh)" >&2; exit 1; }

echo "fuzz: building ${HARNESSES[*]} (preset fuzz, $BUILD)"
if [ ! -f "$BUILD/build.ninja" ]; then cmake --preset fuzz >/dev/null; fi
if ! cmake --build --preset fuzz --target "${HARNESSES[@]}" >"$BUILD/fuzzers-build.log" 2>&1; then
  tail -n 60 "$BUILD/fuzzers-build.log" >&2
  echo "fuzz: build failed (log: $BUILD/fuzzers-build.log)" >&2
  exit 1
fi
echo "fuzz: built in $(elapsed)"

# detect_stack_use_after_return: a harness keeps per-call objects on its stack; a task that
# outlives its call then shows up instead of reading a reused frame.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:detect_stack_use_after_return=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
if [ "$MODE" = ci ]; then rm -rf "$WORK"; fi
mkdir -p "$WORK/artifacts"
failed=()
rows=()
for h in "${HARNESSES[@]}"; do
  bin="$BUILD/fuzz/$h"
  log="$WORK/$h.log"
  h_start=$(date +%s)
  # 1. The regressions: every input that ever crashed, replayed once each.
  mapfile -t regressions < <(find "$ROOT/fuzz/regressions/$h" -type f ! -name '.*' 2>/dev/null | sort)
  if [ ${#regressions[@]} -gt 0 ]; then
    if ! "$bin" -timeout="${FUZZ_TIMEOUT:-25}" "${regressions[@]}" >"$WORK/$h.regressions.log" 2>&1; then
      grep -E "ERROR|runtime error|fuzz check|Running:" "$WORK/$h.regressions.log" | tail -n 20 >&2
      echo "fuzz: $h: a regression input fails again (log: $WORK/$h.regressions.log)" >&2
      failed+=("$h")
      rows+=("| $h | - | - | - | - | - | regression fails |")
      continue
    fi
    echo "fuzz: $h: ${#regressions[@]} regression inputs pass"
  fi
  # 2. Fuzzing from the seed corpus (a scratch copy; --long keeps growing its own).
  corpus="$WORK/corpus/$h"
  mkdir -p "$corpus"
  cp -n "$ROOT/fuzz/corpus/$h"/* "$corpus"/ 2>/dev/null || true
  if [ "$MODE" = ci ]; then
    bound=(-max_total_time="${FUZZ_SECONDS:-60}")
  else
    bound=(-runs="${FUZZ_RUNS:-10000000}")
    if [ -n "${FUZZ_LONG_SECONDS:-}" ]; then bound+=(-max_total_time="$FUZZ_LONG_SECONDS"); fi
  fi
  echo "fuzz: $h: fuzzing (${bound[*]}, corpus $(find "$corpus" -type f | wc -l) inputs)"
  status=0
  "$bin" "${bound[@]}" -timeout="${FUZZ_TIMEOUT:-25}" -rss_limit_mb=3072 \
    -max_len="${MAX_LEN[$h]:-4096}" -print_final_stats=1 \
    -artifact_prefix="$WORK/artifacts/$h-" "$corpus" >"$log" 2>&1 || status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -n 1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  # libFuzzer's own count: inputs in the corpus / their total size.
  corp=$(sed -n 's/.* corp: \([0-9]*\)\/\([0-9]*[KMG]*b\).*/\1 inputs, \2/p' <<<"$last")
  took=$(( $(date +%s) - h_start ))
  if [ "$status" -ne 0 ]; then
    failed+=("$h")
    grep -E "ERROR|runtime error|fuzz check|SUMMARY|ALARM|out-of-memory|leak" "$log" | head -n 20 >&2
    reproducer=$(sed -n "s/.*Test unit written to \(.*\)/\1/p" "$log" | tail -n 1)
    echo "fuzz: $h: FAILED (exit $status) after ${took} s; reproducer: ${reproducer:-none written}; log: $log" >&2
    echo "fuzz: replay with: $bin ${reproducer:-<input>}  (then add it to fuzz/regressions/$h/)" >&2
    rows+=("| $h | ${execs:--} | ${rate:--} | ${cov:--} | ${ft:--} | ${corp:--} | CRASH |")
  else
    echo "fuzz: $h: ok, ${execs} executions (${rate}/s), cov ${cov} ft ${ft}, corpus ${corp}, ${took} s"
    rows+=("| $h | $execs | $rate | $cov | $ft | $corp | 0 crashes |")
  fi
done

summary="$WORK/results.md"
{
  echo "| harness | executions | exec/s | cov | ft | corpus | result |"
  echo "|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} >"$summary"
cat "$summary"
echo "fuzz: $MODE run of ${#HARNESSES[@]} harnesses in $(elapsed) on $(nproc) cores ($(date -u +%F))"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}" >&2
  exit 1
fi
