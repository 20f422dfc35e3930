// Element-type helpers shared by the C++ client, the .npy reader/writer and simserve-cli: a
// byte buffer that does not zero-fill (large results are written exactly once, so zeroing
// would be wasted work) and bulk float16 / bfloat16 -> float32 widening. The element
// conversions themselves have one definition, kernels/dtype.h (header-only target
// simserve_dtype), which the kernel, the server and the client all use.
#ifndef SIMSERVE_CLIENT_DTYPE_H_
#define SIMSERVE_CLIENT_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/dtype.h"

namespace simserve {

// Allocator whose value-less construct() default-initialises, so that
// std::vector<T, DefaultInitAllocator<T>>::resize(n) does not memset trivial types.
template <typename T>
class DefaultInitAllocator : public std::allocator<T> {
 public:
  template <typename U>
  struct rebind {
    using other = DefaultInitAllocator<U>;
  };
  using std::allocator<T>::allocator;

  // Default-initialises (leaves trivial types uninitialised).
  template <typename U>
  void construct(U* ptr) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(ptr)) U;
  }
  // Forwards to the regular constructor when arguments are given.
  template <typename U, typename... Args>
  void construct(U* ptr, Args&&... args) {
    ::new (static_cast<void*>(ptr)) U(std::forward<Args>(args)...);
  }
};

// Raw bytes whose resize() leaves new elements uninitialised.
using ByteVector = std::vector<std::byte, DefaultInitAllocator<std::byte>>;

// Converts `count` little-endian binary16 / bfloat16 elements at `src` to float32 in `dst`
// (exactly, with kernels/dtype.h's conversions). `src` needs 2*count bytes and `dst` count
// floats; no alignment is required of `src`.
inline void HalfToFloat(const std::byte* src, size_t count, float* dst) {
  for (size_t i = 0; i < count; ++i) {
    uint16_t bits = 0;
    std::memcpy(&bits, src + 2 * i, sizeof(bits));
    dst[i] = kernels::F16ToFloat(bits);
  }
}
inline void BFloat16ToFloat(const std::byte* src, size_t count, float* dst) {
  for (size_t i = 0; i < count; ++i) {
    uint16_t bits = 0;
    std::memcpy(&bits, src + 2 * i, sizeof(bits));
    dst[i] = kernels::Bf16ToFloat(bits);
  }
}

}  // namespace simserve

#endif  // SIMSERVE_CLIENT_DTYPE_H_
