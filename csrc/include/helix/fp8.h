// FP8 E4M3 (float8_e4m3fn) decoding, shared by the CPU and CUDA code.
// Layout: sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities; S.1111.111 is
// NaN. Every E4M3 value is exact in fp32, bf16 and fp16, so decoding never rounds.
#pragma once

#include <stdint.h>
#include <string.h>

#include "helix/common.h"

namespace helix {

HELIX_HOST_DEVICE float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

HELIX_HOST_DEVICE float fp8_e4m3_to_float(uint8_t code) {
  const uint32_t sign = static_cast<uint32_t>(code & 0x80u) << 24;
  const uint32_t exponent = (code >> 3) & 0xFu;
  const uint32_t mantissa = code & 0x7u;
  if (exponent == 0xFu && mantissa == 0x7u) return float_from_bits(sign | 0x7FC00000u);  // NaN
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 0.001953125f;  // subnormal: m * 2^-9
    return sign ? -magnitude : magnitude;
  }
  // Normal: rebias the exponent from 7 to 127 and widen the mantissa from 3 to 23 bits.
  return float_from_bits(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

}  // namespace helix
