// Element-type helpers shared by the C++ client, the .npy reader/writer and simserve-cli:
// IEEE binary16 and bfloat16 <-> float32 conversions and a byte buffer that does not
// zero-fill (large results are written exactly once, so zeroing would be wasted work).
#ifndef SIMSERVE_CLIENT_DTYPE_H_
#define SIMSERVE_CLIENT_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

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

// IEEE 754 binary16 bits -> float32 (exact; handles subnormals, Inf and NaN).
float HalfToFloat(uint16_t bits);
// float32 -> IEEE 754 binary16 bits, round to nearest even; overflow gives +-Inf.
uint16_t FloatToHalf(float value);
// bfloat16 bits (upper half of a float32) -> float32 (exact).
float BFloat16ToFloat(uint16_t bits);
// float32 -> bfloat16 bits, round to nearest even; NaN stays NaN.
uint16_t FloatToBFloat16(float value);

// Converts `count` little-endian binary16 / bfloat16 elements at `src` to float32 in `dst`.
// `src` needs 2*count bytes and `dst` count floats; no alignment is required of `src`.
void HalfToFloat(const std::byte* src, size_t count, float* dst);
void BFloat16ToFloat(const std::byte* src, size_t count, float* dst);

}  // namespace simserve

#endif  // SIMSERVE_CLIENT_DTYPE_H_
