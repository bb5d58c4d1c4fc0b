// The vector loops of a merge row on the CPU, shared by merge_states and hopb_combine so that
// both give the same bits (the compiler may contract a * b + c into an FMA differently in
// two copies of a loop).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "helix/common.h"
#include "simd.h"

namespace helix {
namespace {

// acc[d] += weight * values[d] over a contiguous row: a loop the compiler vectorizes (the
// strided loop does not), widening bf16 by its bits.
template <typename T>
HELIX_CPU_CLONES void accumulate_row(const T* __restrict values, float weight, int64_t count, float* __restrict acc) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(values);
    for (int64_t d = 0; d < count; ++d) {
      const uint32_t widened = static_cast<uint32_t>(bits[d]) << 16;
      float value;
      std::memcpy(&value, &widened, sizeof(value));
      acc[d] += weight * value;
    }
  } else {
    for (int64_t d = 0; d < count; ++d) acc[d] += weight * static_cast<float>(values[d]);
  }
}

// out[d] = acc[d] * normalizer in T (bf16 by bf16_round_bits, so that the loop vectorizes).
template <typename T>
HELIX_CPU_CLONES void store_row(const float* __restrict acc, float normalizer, int64_t count, T* __restrict out) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint16_t* bits = reinterpret_cast<uint16_t*>(out);
    for (int64_t d = 0; d < count; ++d) bits[d] = bf16_round_bits(acc[d] * normalizer);
  } else {
    for (int64_t d = 0; d < count; ++d) out[d] = static_cast<T>(acc[d] * normalizer);
  }
}

}  // namespace
}  // namespace helix
