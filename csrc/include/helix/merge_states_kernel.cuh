// merge_states CUDA kernel (torch-free): merges P partial attention states per (b, h).
//
// One thread owns VEC consecutive elements of one (b, h) row (16 bytes when VEC > 1),
// consecutive threads own consecutive vectors of a row, so every warp reads whole
// 16-byte-aligned segments. Each thread recomputes its row's merged LSE from the P
// partial LSEs: those loads are warp-broadcast L1 hits and two expf per part are far
// cheaper than a cross-warp reduction, so rows of any width need no shared memory.
// Parts are consumed PARTS_IN_FLIGHT at a time so that many 16-byte loads are
// outstanding per thread before the first FMA. Parts are read as InT and the merge is
// written as OutT (merge_states: both the op's dtype; flash_decode's split merge: fp32 in,
// q's dtype out).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>

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

template <typename InT, typename OutT, int VEC>
__global__ void __launch_bounds__(kMergeStatesThreads)
    merge_states_kernel(const MergeStatesParams params) {
  const InT* __restrict__ parts_out = static_cast<const InT*>(params.parts_out);
  const float* __restrict__ parts_lse = params.parts_lse;
  OutT* __restrict__ out = static_cast<OutT*>(params.out);

  const int64_t vectors_per_row = params.head_dim / VEC;
  const int64_t total_vectors = params.num_rows * vectors_per_row;
  const int64_t grid_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;

  const int64_t end = total_vectors + (HELIX_PLANT(kPlantLoopBoundOffByOne) ? 1 : 0);
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < end;
       index += grid_stride) {
    const int64_t row = index / vectors_per_row;
    const int64_t element = (index - row * vectors_per_row) * VEC;
    const int64_t batch = row / params.num_heads;
    const int64_t head = row - batch * params.num_heads;

    const float* row_lse =
        parts_lse + batch * params.lse_stride_batch + head * params.lse_stride_head;
    const InT* row_out = parts_out + batch * params.out_stride_batch +
                       head * params.out_stride_head + element * params.out_stride_dim;
    const int64_t lse_stride_part = params.lse_stride_part;
    const int64_t out_stride_part = params.out_stride_part;

    const MergeScale total = merge_scale(
        params.num_parts, [&](int part) { return __ldg(row_lse + part * lse_stride_part); });

    float accumulator[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) accumulator[i] = 0.0f;

    for (int first_part = 0; first_part < params.num_parts;
         first_part += kMergeStatesPartsInFlight) {
      float weights[kMergeStatesPartsInFlight];
      ElementVector<InT, VEC> values[kMergeStatesPartsInFlight];
#pragma unroll
      for (int j = 0; j < kMergeStatesPartsInFlight; ++j) {
        const int part = first_part + j;
        weights[j] = part < params.num_parts
                         ? merge_weight(__ldg(row_lse + part * lse_stride_part), total)
                         : 0.0f;
      }
#pragma unroll
      for (int j = 0; j < kMergeStatesPartsInFlight; ++j) {
        // Absent parts (weight 0) are neither read nor added: their contents may be garbage.
        if (weights[j] != 0.0f) {
          values[j] = load_streaming<InT, VEC>(row_out + (first_part + j) * out_stride_part);
        }
      }
#pragma unroll
      for (int j = 0; j < kMergeStatesPartsInFlight; ++j) {
        if (weights[j] != 0.0f) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            accumulator[i] += weights[j] * ElementTraits<InT>::to_float(values[j].elements[i]);
          }
        }
      }
    }

    ElementVector<OutT, VEC> result;
#pragma unroll
    for (int i = 0; i < VEC; ++i) result.elements[i] = ElementTraits<OutT>::from_float(accumulator[i] * total.normalizer);
    store_vector<OutT, VEC>(out + row * params.head_dim + element, result);
    if (element == 0) params.out_lse[row] = total.lse;
  }
}

// Launches the merge on a stream, 16-byte loads when every (p, b, h) row allows them.
// Returns the launch's error code; callers check it.
template <typename InT, typename OutT>
cudaError_t launch_merge_states(const MergeStatesParams& params, int multiprocessor_count, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(InT);
  const bool vectorizable = params.out_stride_dim == 1 && params.head_dim % kVec == 0 &&
                            params.out_stride_part % kVec == 0 && params.out_stride_batch % kVec == 0 &&
                            params.out_stride_head % kVec == 0 && is_aligned(params.parts_out, 16) &&
                            is_aligned(params.out, kVec * sizeof(OutT));
  const int vec = vectorizable ? kVec : 1;
  const int64_t total_threads = params.num_rows * (params.head_dim / vec);
  const int64_t blocks_needed = (total_threads + kMergeStatesThreads - 1) / kMergeStatesThreads;
  // The kernel is grid-stride, so very large problems reuse a bounded grid.
  const int blocks = static_cast<int>(std::min<int64_t>(blocks_needed, int64_t{multiprocessor_count} * 64));
  if (vectorizable) {
    HELIX_LAUNCH(blocks, kMergeStatesThreads, 0, stream, merge_states_kernel<InT, OutT, kVec>)(params);
  } else {
    HELIX_LAUNCH(blocks, kMergeStatesThreads, 0, stream, merge_states_kernel<InT, OutT, 1>)(params);
  }
  return cudaGetLastError();
}

}  // namespace helix
