// Element conversions between float32, bfloat16 and float16 (bit patterns in uint16_t),
// used by the kernel for inputs and outputs. Round-to-nearest-even; NaN stays NaN.
#ifndef SIMSERVE_KERNELS_DTYPE_H_
#define SIMSERVE_KERNELS_DTYPE_H_

#include <cstdint>
#include <cstring>

namespace simserve::kernels {

// float32 -> bfloat16 bits, round to nearest even.
inline uint16_t FloatToBf16(float value) {
  uint32_t bits = 0;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7f800000U) == 0x7f800000U && (bits & 0x007fffffU) != 0) {
    return static_cast<uint16_t>((bits >> 16) | 0x0040U);  // quiet NaN
  }
  const uint32_t rounding = 0x7fffU + ((bits >> 16) & 1U);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

// bfloat16 bits -> float32 (exact).
inline float Bf16ToFloat(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value = 0.0F;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

// float32 -> IEEE binary16 bits, round to nearest even (overflow -> inf).
inline uint16_t FloatToF16(float value) {
  const _Float16 half = static_cast<_Float16>(value);
  uint16_t bits = 0;
  std::memcpy(&bits, &half, sizeof(bits));
  return bits;
}

// IEEE binary16 bits -> float32 (exact).
inline float F16ToFloat(uint16_t bits) {
  _Float16 half = 0;
  std::memcpy(&half, &bits, sizeof(bits));
  return static_cast<float>(half);
}

}  // namespace simserve::kernels

#endif  // SIMSERVE_KERNELS_DTYPE_H_
