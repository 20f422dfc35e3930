// AlignedBuffer: an owned, uninitialised, 64-byte aligned byte buffer (cache-line and
// AVX-512 aligned). Released with std::free, so its memory can be handed to a gRPC slice
// whose destroy callback frees it.
#ifndef SIMSERVE_SERVER_ALIGNED_BUFFER_H_
#define SIMSERVE_SERVER_ALIGNED_BUFFER_H_

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>

namespace simserve {

struct FreeDeleter {
  void operator()(std::byte* p) const { std::free(p); }
};
using AlignedBuffer = std::unique_ptr<std::byte, FreeDeleter>;

inline constexpr size_t kBufferAlignment = 64;

// `bytes` uninitialised bytes (at least one), 64-byte aligned; empty when out of memory.
inline AlignedBuffer AllocateAligned(int64_t bytes) {
  const size_t size = bytes <= 0 ? kBufferAlignment
                                 : (static_cast<size_t>(bytes) + kBufferAlignment - 1) /
                                       kBufferAlignment * kBufferAlignment;
  return AlignedBuffer(static_cast<std::byte*>(std::aligned_alloc(kBufferAlignment, size)));
}

}  // namespace simserve

#endif  // SIMSERVE_SERVER_ALIGNED_BUFFER_H_
