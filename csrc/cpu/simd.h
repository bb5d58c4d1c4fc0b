// Vector code for the CPU kernels without giving up portability: HELIX_CPU_CLONES compiles a
// function (its loops written for the auto-vectorizer) for AVX-512 (x86-64-v4), AVX2
// (x86-64-v3) and the baseline, and the loader picks the best the CPU runs (GCC's
// target_clones, an ifunc). Elsewhere it is empty and the baseline build is all there is.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define HELIX_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HELIX_CPU_CLONES
#endif

#include <cstdint>
#include <cstring>

#include "helix/common.h"

namespace helix {

// The bf16 bits (in the low half) of fp32 bits `word`, rounded to nearest even; on a uint32_t
// or a vector of them. NaN is the caller's to replace.
template <typename W>
inline W bf16_round_word(W word) {
  return (word + 0x7FFFu + ((word >> 16) & 1u)) >> 16;
}

// float -> bf16 bits, round to nearest even, NaN as the canonical quiet NaN (c10's conversion,
// written without a branch so that loops of it vectorize).
inline uint16_t bf16_round_bits(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  return value != value ? kQuietNanBitsBf16 : static_cast<uint16_t>(bf16_round_word(word));
}

// 16 (or 8) floats as one vector (GCC's vector extension: one zmm register under AVX-512, two ymm
// under AVX2, pieces in the baseline), for loops the auto-vectorizer would not write well:
// several independent accumulators, a horizontal sum per dot product, bf16 widened on load.
// The helpers are always inlined, so each HELIX_CPU_CLONES caller gets its own ISA's code.
#if defined(__GNUC__)
// (The always-inlined helpers never pass these types across a call: GCC's ABI note does not apply.)
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float F32x16 __attribute__((vector_size(64)));
typedef float F32x8 __attribute__((vector_size(32)));
typedef float F32x4 __attribute__((vector_size(16)));
typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef uint32_t U32x8 __attribute__((vector_size(32)));
typedef uint8_t U8x8 __attribute__((vector_size(8)));
#define HELIX_VECTOR_INLINE inline __attribute__((always_inline))

HELIX_VECTOR_INLINE F32x16 load_f32x16(const float* source) {
  F32x16 v;
  std::memcpy(&v, source, sizeof(v));
  return v;
}

// 16 bf16 values (their bits) widened to float: exact.
HELIX_VECTOR_INLINE F32x16 widen_bf16x16(U16x16 bits) {
  const U32x16 wide = __builtin_convertvector(bits, U32x16) << 16;
  F32x16 v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
}

HELIX_VECTOR_INLINE F32x16 load_f32x16_from_bf16(const uint16_t* source) {
  U16x16 bits;
  std::memcpy(&bits, source, sizeof(bits));
  return widen_bf16x16(bits);
}

HELIX_VECTOR_INLINE void store_f32x16(float* destination, F32x16 v) { std::memcpy(destination, &v, sizeof(v)); }

// Sum of the 16 lanes, as a tree: (lane i + lane i+8), then +4, +2, +1.
HELIX_VECTOR_INLINE float horizontal_sum(F32x16 v) {
  const F32x8 eight = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                      __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const F32x4 four = __builtin_shufflevector(eight, eight, 0, 1, 2, 3) + __builtin_shufflevector(eight, eight, 4, 5, 6, 7);
  return (four[0] + four[2]) + (four[1] + four[3]);
}
#else
#define HELIX_VECTOR_INLINE inline
#endif

}  // namespace helix
