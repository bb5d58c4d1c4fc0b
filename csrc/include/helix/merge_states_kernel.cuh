// merge_states CUDA kernel (torch-free): merges P partial attention states per (b, h).
//
// One thread owns VEC consecutive elements of one (b, h) row (16 bytes when VEC > 1),
// consecutive threads own consecutive vectors of a row, so every warp reads whole
// 16-byte-aligned segments. Each thread recomputes its row's merged LSE from the P
// partial LSEs: those loads are warp-broadcast L1 hits and two expf per part are far
// cheaper than a cross-warp reduction, so rows of any width need no shared memory.
// Parts are consumed PARTS_IN_FLIGHT at a time so that many 16-byte loads are
// outstanding per thread before the first FMA.
#pragma once

#include <stdint.h>

#include "helix/softmax_merge.h"
#include "helix/vec.cuh"

namespace helix {

struct MergeStatesParams {
  const void* parts_out;  // [P, B, H, D], strides below (elements)
  const float* parts_lse;  // [P, B, H], strides below (elements)
  void* out;               // [B, H, D] contiguous
  float* out_lse;          // [B, H] contiguous
  int num_parts;
  int num_heads;
  int64_t head_dim;
  int64_t num_rows;  // B * H
  int64_t out_stride_part, out_stride_batch, out_stride_head, out_stride_dim;
  int64_t lse_stride_part, lse_stride_batch, lse_stride_head;
};

constexpr int kMergeStatesThreads = 256;
constexpr int kMergeStatesPartsInFlight = 8;

template <typename T, int VEC>
__global__ void __launch_bounds__(kMergeStatesThreads)
    merge_states_kernel(const MergeStatesParams params) {
  using Traits = ElementTraits<T>;
  const T* __restrict__ parts_out = static_cast<const T*>(params.parts_out);
  const float* __restrict__ parts_lse = params.parts_lse;
  T* __restrict__ out = static_cast<T*>(params.out);

  const int64_t vectors_per_row = params.head_dim / VEC;
  const int64_t total_vectors = params.num_rows * vectors_per_row;
  const int64_t grid_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;

  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       index < total_vectors; index += grid_stride) {
    const int64_t row = index / vectors_per_row;
    const int64_t element = (index - row * vectors_per_row) * VEC;
    const int64_t batch = row / params.num_heads;
    const int64_t head = row - batch * params.num_heads;

    const float* row_lse =
        parts_lse + batch * params.lse_stride_batch + head * params.lse_stride_head;
    const T* row_out = parts_out + batch * params.out_stride_batch +
                       head * params.out_stride_head + element * params.out_stride_dim;
    const int64_t lse_stride_part = params.lse_stride_part;
    const int64_t out_stride_part = params.out_stride_part;

    const float total_lse = merged_lse(
        params.num_parts, [&](int part) { return __ldg(row_lse + part * lse_stride_part); });

    float accumulator[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) accumulator[i] = 0.0f;

    for (int first_part = 0; first_part < params.num_parts;
         first_part += kMergeStatesPartsInFlight) {
      float weights[kMergeStatesPartsInFlight];
      ElementVector<T, VEC> values[kMergeStatesPartsInFlight];
#pragma unroll
      for (int j = 0; j < kMergeStatesPartsInFlight; ++j) {
        const int part = first_part + j;
        weights[j] = part < params.num_parts
                         ? merge_weight(__ldg(row_lse + part * lse_stride_part), total_lse)
                         : 0.0f;
      }
#pragma unroll
      for (int j = 0; j < kMergeStatesPartsInFlight; ++j) {
        // Absent parts (weight 0) are neither read nor added: their contents may be garbage.
        if (weights[j] != 0.0f) {
          values[j] = load_streaming<T, VEC>(row_out + (first_part + j) * out_stride_part);
        }
      }
#pragma unroll
      for (int j = 0; j < kMergeStatesPartsInFlight; ++j) {
        if (weights[j] != 0.0f) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            accumulator[i] += weights[j] * Traits::to_float(values[j].elements[i]);
          }
        }
      }
    }

    ElementVector<T, VEC> result;
#pragma unroll
    for (int i = 0; i < VEC; ++i) result.elements[i] = Traits::from_float(accumulator[i]);
    store_vector<T, VEC>(out + row * params.head_dim + element, result);
    if (element == 0) params.out_lse[row] = total_lse;
  }
}

}  // namespace helix
