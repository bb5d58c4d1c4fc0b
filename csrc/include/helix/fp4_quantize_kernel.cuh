// FP4 quantize / dequantize CUDA kernels (torch-free). The per-element math is the shared
// codec of helix/fp4.h, so these kernels and the CPU ones produce identical bits.
//   amax_kernel:       max |x| over the tensor into one fp32 (NaN and inf ignored), for NVFP4's
//                      global scale; one atomicMax per warp on the float's bits.
//   quantize_kernel:   one thread per scale block (16 or 32 elements): loads the block
//                      (16-byte loads when rows allow), writes its packed bytes and scale.
//   dequantize_kernel: one thread per scale block, the inverse.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "helix/fp4.h"
#include "helix/vec.cuh"

namespace helix {

struct Fp4QuantizeParams {
  const void* x;  // [rows, cols]
  int64_t rows, cols, x_stride_row;  // the column stride is 1
  uint8_t* packed;                   // [rows, cols / 2] contiguous
  uint8_t* scales;                   // [rows, cols / block] contiguous (e4m3 or e8m0 codes)
  float* global_scale_out;           // [] : the global scale used (1.0 for MXFP4)
  const float* global_scale_in;      // NVFP4: a given multiplier, or nullptr to derive it from amax
  const uint32_t* amax_bits;         // NVFP4 without a given multiplier: max |x| as float bits
  bool nvfp4;
};

constexpr int kFp4Threads = 256;

// VEC elements per load: 16 bytes when every row starts 16-byte aligned (the launcher
// checks), else 1.
template <typename T, int VEC>
__global__ void __launch_bounds__(kFp4Threads)
    amax_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, int64_t stride_row, uint32_t* amax_bits) {
  float local = 0.0f;
  const int64_t vectors_per_row = cols / VEC, total = rows * vectors_per_row;
  for (int64_t index = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = index / vectors_per_row, col = (index - row * vectors_per_row) * VEC;
    const auto values = load_streaming<T, VEC>(x + row * stride_row + col);
#pragma unroll
    for (int i = 0; i < VEC; ++i) local = max_magnitude(local, tensor_amax_magnitude(ElementTraits<T>::to_float(values.elements[i])));
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    local = max_magnitude(local, __shfl_xor_sync(0xffffffffu, local, offset));
  }
  // Non-negative floats order like their bit patterns, so an integer max is a float max.
  if (threadIdx.x % 32 == 0 && local > 0.0f) atomicMax(amax_bits, float_bits(local));
}

template <typename T, int BLOCK, bool VECTOR>
HELIX_DEVICE void load_block(const T* source, float (&values)[BLOCK]) {
  if constexpr (VECTOR) {
    constexpr int PER_LOAD = 16 / sizeof(T);
#pragma unroll
    for (int i = 0; i < BLOCK / PER_LOAD; ++i) {
      const auto chunk = load_streaming<T, PER_LOAD>(source + i * PER_LOAD);
#pragma unroll
      for (int j = 0; j < PER_LOAD; ++j) values[i * PER_LOAD + j] = ElementTraits<T>::to_float(chunk.elements[j]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < BLOCK; ++i) values[i] = ElementTraits<T>::to_float(source[i]);
  }
}

template <typename T, int BLOCK, bool VECTOR>
__global__ void __launch_bounds__(kFp4Threads) quantize_kernel(const Fp4QuantizeParams params) {
  const int64_t blocks_per_row = params.cols / BLOCK, total = params.rows * blocks_per_row;
  float global_scale = 1.0f;
  if (params.nvfp4) {
    global_scale = params.global_scale_in != nullptr ? *params.global_scale_in
                                                     : nvfp4_global_scale(float_from_bits(*params.amax_bits));
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) *params.global_scale_out = global_scale;
  const T* x = static_cast<const T*>(params.x);
  for (int64_t index = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = index / blocks_per_row, block = index - row * blocks_per_row;
    float values[BLOCK];
    load_block<T, BLOCK, VECTOR>(x + row * params.x_stride_row + block * BLOCK, values);
    ElementVector<uint8_t, BLOCK / 2> packed;
    params.scales[index] = quantize_fp4_block<BLOCK>(values, params.nvfp4, global_scale, packed.elements);
    store_vector<uint8_t, BLOCK / 2>(params.packed + index * (BLOCK / 2), packed);
  }
}

struct Fp4DequantizeParams {
  const uint8_t* packed;  // [rows, cols / 2] contiguous
  const uint8_t* scales;  // [rows, cols / block] contiguous
  const float* global_scale;
  void* out;  // [rows, cols] contiguous
  int64_t rows, cols;
  bool nvfp4;
};

template <typename T, int BLOCK>
__global__ void __launch_bounds__(kFp4Threads) dequantize_kernel(const Fp4DequantizeParams params) {
  const int64_t total = params.rows * (params.cols / BLOCK);
  const float global_scale = params.nvfp4 ? *params.global_scale : 1.0f;
  T* out = static_cast<T*>(params.out);
  for (int64_t index = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x) {
    const uint8_t code = params.scales[index];
    const float multiplier = params.nvfp4 ? nvfp4_block_multiplier(code, global_scale) : mxfp4_scale_value(code);
    const auto bytes = *reinterpret_cast<const ElementVector<uint8_t, BLOCK / 2>*>(params.packed + index * (BLOCK / 2));
    // BLOCK elements are 32 to 128 bytes: built and written as 16-byte pieces.
    constexpr int PER_STORE = 16 / sizeof(T);
#pragma unroll
    for (int i = 0; i < BLOCK / PER_STORE; ++i) {
      ElementVector<T, PER_STORE> piece;
#pragma unroll
      for (int j = 0; j < PER_STORE; ++j) {
        const int element = i * PER_STORE + j;
        const float value = dequantize_fp4_element(bytes.elements[element / 2], element % 2, multiplier);
        // NaN as the canonical pattern of T (what the CPU writes), not the GPU's 0x7FFF.
        piece.elements[j] = value == value ? ElementTraits<T>::from_float(value) : ElementTraits<T>::quiet_nan();
      }
      store_vector<T, PER_STORE>(out + index * BLOCK + i * PER_STORE, piece);
    }
  }
}

}  // namespace helix
