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

// float -> bf16 bits, round to nearest even, NaN as the canonical quiet NaN (c10's conversion,
// written without a branch so that loops of it vectorize).
inline uint16_t bf16_round_bits(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  const uint32_t rounded = (word + 0x7FFFu + ((word >> 16) & 1u)) >> 16;
  return value != value ? kQuietNanBitsBf16 : static_cast<uint16_t>(rounded);
}

}  // namespace helix
