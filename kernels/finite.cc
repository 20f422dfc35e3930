#include "kernels/finite.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace simserve::kernels {
namespace {

// Compiled for AVX-512 and the baseline, picked at load time by an ifunc resolver. Not under
// ThreadSanitizer: the resolver runs before TSan's runtime is set up and crashes it.
#if defined(__SANITIZE_THREAD__)
#define SIMSERVE_MULTIVERSIONED
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SIMSERVE_MULTIVERSIONED
#endif
#endif
#ifndef SIMSERVE_MULTIVERSIONED
#define SIMSERVE_MULTIVERSIONED __attribute__((target_clones("arch=skylake-avx512", "default")))
#endif

// True if any of `count` elements has an all-ones exponent (`mask`): branch-free passes that
// the compiler vectorises (the scan reads every input byte). Not templates: clang cannot
// multiversion those.
SIMSERVE_MULTIVERSIONED bool AnyNonFinite32(const std::byte* data, int64_t count) {
  uint32_t any = 0;
  for (int64_t i = 0; i < count; ++i) {
    uint32_t bits = 0;
    std::memcpy(&bits, data + i * 4, 4);
    any |= static_cast<uint32_t>((bits & 0x7f800000U) == 0x7f800000U);
  }
  return any != 0;
}

SIMSERVE_MULTIVERSIONED bool AnyNonFinite16(const std::byte* data, int64_t count, uint16_t mask) {
  uint16_t any = 0;
  for (int64_t i = 0; i < count; ++i) {
    uint16_t bits = 0;
    std::memcpy(&bits, data + i * 2, 2);
    any |= static_cast<uint16_t>((bits & mask) == mask);
  }
  return any != 0;
}

// The serial scan: a fast any-pass, then the index only when something was found.
template <typename Bits>
int64_t FirstNonFiniteSerial(const std::byte* data, int64_t count, Bits mask) {
  const bool any = sizeof(Bits) == 4 ? AnyNonFinite32(data, count)
                                     : AnyNonFinite16(data, count, static_cast<uint16_t>(mask));
  if (!any) return -1;
  for (int64_t i = 0; i < count; ++i) {
    Bits bits = 0;
    std::memcpy(&bits, data + i * static_cast<int64_t>(sizeof(Bits)), sizeof(Bits));
    if ((bits & mask) == mask) return i;
  }
  return -1;
}

template <typename Bits>
int64_t FirstNonFiniteOf(const std::byte* data, int64_t count, Bits mask, int threads) {
  const int64_t bytes = count * static_cast<int64_t>(sizeof(Bits));
  if (threads <= 1 || bytes < kParallelFiniteScanBytes) {
    return FirstNonFiniteSerial(data, count, mask);
  }
  // One contiguous part per thread (memory-bound: no finer split pays); the first hit of the
  // lowest part wins, so the index is the same as the serial scan's.
  std::vector<int64_t> first(static_cast<size_t>(threads), -1);
  const int64_t part = (count + threads - 1) / threads;
#pragma omp parallel for schedule(static, 1) num_threads(threads)
  for (int t = 0; t < threads; ++t) {
    const int64_t begin = std::min(count, t * part);
    const int64_t end = std::min(count, begin + part);
    const int64_t hit =
        FirstNonFiniteSerial(data + begin * static_cast<int64_t>(sizeof(Bits)), end - begin, mask);
    if (hit >= 0) first[static_cast<size_t>(t)] = begin + hit;
  }
  for (const int64_t hit : first) {
    if (hit >= 0) return hit;
  }
  return -1;
}

}  // namespace

int64_t FirstNonFinite(const std::byte* data, int64_t count, DataType dtype, int threads) {
  // float32: exponent 0x7f800000; bfloat16: 0x7f80; float16: 0x7c00.
  if (dtype == DataType::kFloat32) {
    return FirstNonFiniteOf<uint32_t>(data, count, 0x7f800000U, threads);
  }
  return FirstNonFiniteOf<uint16_t>(data, count, dtype == DataType::kBFloat16 ? 0x7f80U : 0x7c00U,
                                    threads);
}

}  // namespace simserve::kernels
