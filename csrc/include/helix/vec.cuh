// Torch-free device helpers: 16-byte vector loads/stores and fp32 conversion of
// the element types helix-ext kernels read (fp32, fp16, bf16).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "helix/common.h"
#include "helix/fp8.h"

namespace helix {

template <typename T>
struct ElementTraits;

template <>
struct ElementTraits<float> {
  HELIX_DEVICE static float to_float(float x) { return x; }
  HELIX_DEVICE static float from_float(float x) { return x; }
  HELIX_DEVICE static float quiet_nan() { return float_from_bits(kQuietNanBitsF32); }
};

template <>
struct ElementTraits<__half> {
  HELIX_DEVICE static float to_float(__half x) { return __half2float(x); }
  HELIX_DEVICE static __half from_float(float x) { return __float2half_rn(x); }
  HELIX_DEVICE static __half quiet_nan() { return __ushort_as_half(kQuietNanBitsF16); }
};

template <>
struct ElementTraits<__nv_bfloat16> {
  HELIX_DEVICE static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  HELIX_DEVICE static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  HELIX_DEVICE static __nv_bfloat16 quiet_nan() { return __ushort_as_bfloat16(kQuietNanBitsBf16); }
};

// N elements of T held in registers, loaded or stored as one access of N * sizeof(T)
// bytes (16 for the vector paths, so the compiler emits LDG.E.128 / STG.E.128).
template <typename T, int N>
struct alignas(sizeof(T) * N) ElementVector {
  T elements[N];
};

// Streaming load (evict-first): partial states are read exactly once.
template <typename T, int N>
HELIX_DEVICE ElementVector<T, N> load_streaming(const T* address) {
  static_assert(sizeof(ElementVector<T, N>) == 16 || N == 1, "vector path expects 16-byte accesses");
  ElementVector<T, N> result;
  if constexpr (sizeof(ElementVector<T, N>) == 16) {
    const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(address));
    result = *reinterpret_cast<const ElementVector<T, N>*>(&raw);
  } else {
    result.elements[0] = *address;
  }
  return result;
}

template <typename T, int N>
HELIX_DEVICE void store_vector(T* address, const ElementVector<T, N>& value) {
  *reinterpret_cast<ElementVector<T, N>*>(address) = value;
}

}  // namespace helix
