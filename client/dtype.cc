// Bit-exact float16 / bfloat16 conversions for the client side (no hardware intrinsics, so
// the client builds and behaves the same on any CPU).
#include "client/dtype.h"

#include <bit>
#include <cmath>
#include <cstring>

namespace simserve {

float HalfToFloat(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000U) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1FU;
  uint32_t mantissa = bits & 0x3FFU;
  uint32_t out = 0;
  if (exponent == 0x1FU) {  // Inf / NaN
    out = sign | 0x7F800000U | (mantissa << 13);
  } else if (exponent != 0) {  // normal
    out = sign | ((exponent + 112U) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {  // +-0
    out = sign;
  } else {  // subnormal: renormalise
    int shift = 0;
    while ((mantissa & 0x400U) == 0) {
      mantissa <<= 1;
      ++shift;
    }
    mantissa &= 0x3FFU;
    out = sign | (static_cast<uint32_t>(113 - shift) << 23) | (mantissa << 13);
  }
  return std::bit_cast<float>(out);
}

uint16_t FloatToHalf(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  const auto sign = static_cast<uint16_t>((bits >> 16) & 0x8000U);
  const uint32_t abs_bits = bits & 0x7FFFFFFFU;
  if (abs_bits >= 0x7F800000U) {  // Inf / NaN (keep NaN quiet and non-zero)
    return static_cast<uint16_t>(sign | 0x7C00U | (abs_bits > 0x7F800000U ? 0x200U : 0U));
  }
  if (abs_bits >= 0x477FF000U) {  // rounds to >= 65520: overflow to Inf
    return static_cast<uint16_t>(sign | 0x7C00U);
  }
  if (abs_bits < 0x38800000U) {  // below the smallest normal half: subnormal or zero
    // Scale so that the half subnormal unit (2^-24) becomes 1, then round to nearest even.
    const float scaled = std::bit_cast<float>(abs_bits) * 16777216.0F;  // * 2^24
    const auto rounded = static_cast<uint32_t>(std::nearbyint(scaled));
    return static_cast<uint16_t>(sign | rounded);
  }
  // Normal: rebias exponent, round mantissa from 23 to 10 bits (nearest even).
  const uint32_t rebased = abs_bits - 0x38000000U;  // exponent bias 127 -> 15
  const uint32_t lsb = (rebased >> 13) & 1U;
  const uint32_t rounded = (rebased + 0xFFFU + lsb) >> 13;
  return static_cast<uint16_t>(sign | rounded);
}

float BFloat16ToFloat(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

uint16_t FloatToBFloat16(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  if ((bits & 0x7FFFFFFFU) > 0x7F800000U) {
    return static_cast<uint16_t>((bits >> 16) | 0x40U);  // quiet NaN
  }
  const uint32_t lsb = (bits >> 16) & 1U;
  return static_cast<uint16_t>((bits + 0x7FFFU + lsb) >> 16);
}

void HalfToFloat(const std::byte* src, size_t count, float* dst) {
  for (size_t i = 0; i < count; ++i) {
    uint16_t bits = 0;
    std::memcpy(&bits, src + 2 * i, sizeof(bits));
    dst[i] = HalfToFloat(bits);
  }
}

void BFloat16ToFloat(const std::byte* src, size_t count, float* dst) {
  for (size_t i = 0; i < count; ++i) {
    uint16_t bits = 0;
    std::memcpy(&bits, src + 2 * i, sizeof(bits));
    dst[i] = BFloat16ToFloat(bits);
  }
}

}  // namespace simserve
