// The element types of simserve tensors and their one definition: sizes, and conversions
// between float32, bfloat16 and float16 (bit patterns in uint16_t). Round-to-nearest-even;
// NaN stays NaN. Header-only (CMake target simserve_dtype): kernels, server and the C++
// client share it.
#ifndef SIMSERVE_KERNELS_DTYPE_H_
#define SIMSERVE_KERNELS_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace simserve::kernels {

enum class DataType { kFloat32, kBFloat16, kFloat16 };

// Bytes per element of `dtype` (4 or 2).
constexpr size_t SizeOf(DataType dtype) { return dtype == DataType::kFloat32 ? 4 : 2; }

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

// float32 -> IEEE binary16 bits, round to nearest even (overflow -> inf, NaN stays NaN).
// Bit manipulation rather than _Float16, which clang 14 does not support on x86.
inline uint16_t FloatToF16(float value) {
  uint32_t bits = 0;
  std::memcpy(&bits, &value, sizeof(bits));
  const auto sign = static_cast<uint16_t>((bits >> 16) & 0x8000U);
  const uint32_t magnitude = bits & 0x7fffffffU;
  if (magnitude >= 0x7f800000U) {  // inf or NaN
    return static_cast<uint16_t>(sign | 0x7c00U | (magnitude > 0x7f800000U ? 0x0200U : 0U));
  }
  if (magnitude >= 0x477ff000U) return static_cast<uint16_t>(sign | 0x7c00U);  // >= 65520
  if (magnitude < 0x38800000U) {  // below 2^-14: a half subnormal (or zero)
    float abs_value = 0.0F;
    std::memcpy(&abs_value, &magnitude, sizeof(abs_value));
    // Units of 2^-24; the scaling is exact and the conversion rounds to nearest even.
    const float units = abs_value * 16777216.0F;
    auto rounded = static_cast<uint32_t>(units);
    const float rest = units - static_cast<float>(rounded);
    if (rest > 0.5F || (rest == 0.5F && (rounded & 1U) != 0)) ++rounded;
    return static_cast<uint16_t>(sign | rounded);
  }
  uint32_t rebased = magnitude - 0x38000000U;  // exponent bias 127 -> 15
  rebased += 0x0fffU + ((rebased >> 13) & 1U);
  return static_cast<uint16_t>(sign | (rebased >> 13));
}

// IEEE binary16 bits -> float32 (exact).
inline float F16ToFloat(uint16_t half) {
  const uint32_t sign = static_cast<uint32_t>(half & 0x8000U) << 16;
  const uint32_t exponent = (half >> 10) & 0x1fU;
  const uint32_t mantissa = half & 0x3ffU;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8F;
    return sign != 0 ? -magnitude : magnitude;
  }
  const uint32_t bits = exponent == 31 ? sign | 0x7f800000U | (mantissa << 13)
                                       : sign | ((exponent + 112) << 23) | (mantissa << 13);
  float value = 0.0F;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

}  // namespace simserve::kernels

#endif  // SIMSERVE_KERNELS_DTYPE_H_
