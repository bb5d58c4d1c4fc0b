// FP4 (E2M1) codecs shared by the CPU and CUDA kernels: NVFP4 and MXFP4 (OCP MX v1.0).
// Every function here is plain IEEE fp32 arithmetic (divisions and products, no fused
// operations, no approximate intrinsics), so the CPU and the GPU produce identical bits.
//
// E2M1 codes 0..7 are +{0, 0.5, 1, 1.5, 2, 3, 4, 6}; bit 3 is the sign. Two codes per byte:
// element 2i in the low nibble, element 2i+1 in the high nibble.
//   NVFP4: one E4M3 scale per 16 elements and one fp32 global scale (a decode multiplier):
//          global = amax / (6 * 448) (1 when amax is 0),
//          s = e4m3(clamp((block_amax / 6) / global, 2^-9, 448)),
//          q = rne_e2m1(x / (float(s) * global)),  x ~= e2m1(q) * float(s) * global.
//   MXFP4: one E8M0 scale per 32 elements, X = 2^(floor(log2(block_amax)) - 2) clamped to
//          [2^-127, 2^127] (an all-zero block takes 2^-127), q = rne_e2m1(x / X).
// Non-finite elements: NaN quantizes to 0 and counts as 0 in every amax; +-inf saturates (it
// counts as +-FLT_MAX in its block's amax and takes the code +-6) and stays out of NVFP4's
// tensor amax, so the global scale, and every block without an inf, is what it would be
// without it. The global scale is never 0: an amax whose amax / 2688 underflows gives 1.0,
// like an all-zero tensor.
#pragma once

#include <stdint.h>

#include "helix/common.h"
#include "helix/fp8.h"

namespace helix {

constexpr int kNvfp4Block = 16;
constexpr int kMxfp4Block = 32;
constexpr float kE4m3Max = 448.0f;
constexpr float kE4m3MinSubnormal = 0.001953125f;  // 2^-9
constexpr float kE2m1Max = 6.0f;
constexpr float kFloatMax = 3.402823466e38f;

HELIX_HOST_DEVICE uint32_t float_bits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

HELIX_HOST_DEVICE float absolute(float value) { return float_from_bits(float_bits(value) & 0x7FFFFFFFu); }

// What an element adds to NVFP4's tensor amax: |x| when finite, 0 for NaN and +-inf.
HELIX_HOST_DEVICE float tensor_amax_magnitude(float x) {
  const float a = absolute(x);
  return a <= kFloatMax ? a : 0.0f;
}

// What an element adds to its block's amax: |x|, +-inf saturated to FLT_MAX, NaN as 0.
HELIX_HOST_DEVICE float block_amax_magnitude(float x) {
  const float a = absolute(x);
  if (a <= kFloatMax) return a;
  return a == a ? kFloatMax : 0.0f;
}

// max of two magnitudes (never NaN: see the two functions above).
HELIX_HOST_DEVICE float max_magnitude(float a, float b) { return a > b ? a : b; }

// Value of a 4-bit E2M1 code (the low nibble of `code`).
HELIX_HOST_DEVICE float e2m1_to_float(uint32_t code) {
  const uint32_t exponent = (code >> 1) & 0x3u, mantissa = code & 0x1u;
  const float magnitude = exponent == 0 ? 0.5f * static_cast<float>(mantissa)
                                        : static_cast<float>(2 + mantissa) * static_cast<float>(1u << exponent) * 0.25f;
  return (code & 0x8u) ? -magnitude : magnitude;
}

// Nearest E2M1 code to x, ties to the even code, saturating at +-6. NaN gives code 0; a
// value that rounds to zero gives +0 (code 0) whatever its sign.
HELIX_HOST_DEVICE uint32_t float_to_e2m1(float x) {
  const float a = absolute(x);
  uint32_t code;
  if (!(a > 0.25f)) {
    code = 0;  // [0, 0.25] (the tie 0.25 goes to the even code 0), and NaN
  } else if (a < 0.75f) {
    code = 1;  // 0.5
  } else if (a <= 1.25f) {
    code = 2;  // 1.0 (ties 0.75 and 1.25 go to the even code 2)
  } else if (a < 1.75f) {
    code = 3;  // 1.5
  } else if (a <= 2.5f) {
    code = 4;  // 2.0 (ties 1.75 and 2.5)
  } else if (a < 3.5f) {
    code = 5;  // 3.0
  } else if (a <= 5.0f) {
    code = 6;  // 4.0 (ties 3.5 and 5)
  } else {
    code = 7;  // 6.0, saturating
  }
  return (code != 0 && x < 0.0f) ? (code | 0x8u) : code;
}

// E4M3 code of a value in [2^-9, 448] (the caller clamps), rounded to nearest even.
HELIX_HOST_DEVICE uint8_t e4m3_from_float(float value) {
  const uint32_t bits = float_bits(value);
  const int exponent = static_cast<int>((bits >> 23) & 0xFFu) - 127;
  if (exponent < -6) {
    // Subnormal E4M3: multiples of 2^-9. value * 512 is exact; round half to even.
    const float steps = value * 512.0f;
    uint32_t whole = static_cast<uint32_t>(steps);
    const float fraction = steps - static_cast<float>(whole);
    if (fraction > 0.5f || (fraction == 0.5f && (whole & 1u))) ++whole;
    return static_cast<uint8_t>(whole);  // 8 (2^-6) is also the first normal code
  }
  uint32_t mantissa = (bits & 0x7FFFFFu) >> 20;
  const uint32_t remainder = bits & 0xFFFFFu;
  if (remainder > 0x80000u || (remainder == 0x80000u && (mantissa & 1u))) ++mantissa;
  uint32_t biased = static_cast<uint32_t>(exponent + 7);
  if (mantissa == 8) {
    mantissa = 0;
    ++biased;
  }
  return static_cast<uint8_t>((biased << 3) | mantissa);
}

// NVFP4 per-tensor global scale from the tensor's (finite) amax: amax / 2688, or 1.0 when that
// is 0 (an all-zero tensor, or an amax below ~4e-42 whose quotient underflows), never 0.
HELIX_HOST_DEVICE float nvfp4_global_scale(float amax) {
  const float scale = amax / (kE2m1Max * kE4m3Max);
  return scale > 0.0f ? scale : 1.0f;
}

// NVFP4 block scale code; the clamp comes before the cast, so neither an all-zero block
// (0 / global) nor a huge one can make a NaN.
HELIX_HOST_DEVICE uint8_t nvfp4_scale_code(float block_amax, float global_scale) {
  float scale = (block_amax / kE2m1Max) / global_scale;
  if (!(scale >= kE4m3MinSubnormal)) scale = kE4m3MinSubnormal;  // also NaN
  if (scale > kE4m3Max) scale = kE4m3Max;
  return e4m3_from_float(scale);
}

// The divisor of a NVFP4 block: float(s) * global (dequantization multiplies by it).
HELIX_HOST_DEVICE float nvfp4_block_multiplier(uint8_t scale_code, float global_scale) {
  return fp8_e4m3_to_float(scale_code) * global_scale;
}

// MXFP4 E8M0 scale code (biased exponent) of a block.
HELIX_HOST_DEVICE uint8_t mxfp4_scale_code(float block_amax) {
  // floor(log2(amax)) from the exponent field; zero and subnormal amax land below the
  // clamp (an all-zero block takes the smallest scale, 2^-127).
  const int exponent_field = static_cast<int>((float_bits(block_amax) >> 23) & 0xFFu);
  int exponent = exponent_field == 0 ? -127 : exponent_field - 127 - 2;
  if (exponent < -127) exponent = -127;
  if (exponent > 127) exponent = 127;
  return static_cast<uint8_t>(exponent + 127);
}

// 2^(code - 127); code 0 is 2^-127 (an fp32 subnormal, still exact), 0xFF is NaN.
HELIX_HOST_DEVICE float mxfp4_scale_value(uint8_t code) {
  if (code == 0xFFu) return float_from_bits(kQuietNanBitsF32);
  if (code == 0) return float_from_bits(0x00400000u);
  return float_from_bits(static_cast<uint32_t>(code) << 23);
}

// Quantizes one block (16 values for NVFP4, 32 for MXFP4) into packed bytes; returns the
// block's scale code.
template <int BLOCK>
HELIX_HOST_DEVICE uint8_t quantize_fp4_block(const float (&values)[BLOCK], bool nvfp4, float global_scale,
                                             uint8_t (&packed)[BLOCK / 2]) {
  float block_amax = 0.0f;
  for (int i = 0; i < BLOCK; ++i) block_amax = max_magnitude(block_amax, block_amax_magnitude(values[i]));
  uint8_t scale_code;
  float divisor;
  if (nvfp4) {
    scale_code = nvfp4_scale_code(block_amax, global_scale);
    divisor = nvfp4_block_multiplier(scale_code, global_scale);
  } else {
    scale_code = mxfp4_scale_code(block_amax);
    divisor = mxfp4_scale_value(scale_code);
  }
  for (int i = 0; i < BLOCK / 2; ++i) {
    const uint32_t low = float_to_e2m1(values[2 * i] / divisor);
    const uint32_t high = float_to_e2m1(values[2 * i + 1] / divisor);
    packed[i] = static_cast<uint8_t>(low | (high << 4));
  }
  return scale_code;
}

// Dequantized value of element `index` (0 or 1) of a packed byte. A NaN multiplier (scale
// codes e4m3 0x7F/0xFF, e8m0 0xFF) gives the canonical quiet NaN (kQuietNanBitsF32) whatever the
// code's sign: x86 would keep the NaN operand's sign and payload, a GPU makes its own.
HELIX_HOST_DEVICE float dequantize_fp4_element(uint8_t byte, int index, float block_multiplier) {
  if (block_multiplier != block_multiplier) return float_from_bits(kQuietNanBitsF32);
  return e2m1_to_float(index == 0 ? byte & 0xFu : byte >> 4) * block_multiplier;
}

}  // namespace helix
