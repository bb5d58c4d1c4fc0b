// HOP-B launcher bodies, device-agnostic: hopb_signal (one thread: epoch + release flag),
// hopb_combine (flag waits, then the merge of peer partials read in place) and hopb_all_reduce
// (flag waits, then the sum of peer parts read in place). The peer views'
// addresses travel as kernel parameters, so a captured CUDA graph replays them without host
// work. Shared by the CUDA ops (hopb_combine.cu) and the SIMT host runtime's (csrc/simt/ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "cuda/launch_context.h"
#include "helix/hopb_combine_kernel.cuh"
#include "hopb_args.h"

namespace helix {
namespace hopb_launch {

// After the device-independent checks (check_hopb_signal_args).
inline void signal(at::Tensor& flags, at::Tensor& epoch, int64_t chunk, const LaunchContext& context) {
  HELIX_LAUNCH(1, 1, 0, context.stream, hopb_signal_kernel)(flags.mutable_data_ptr<int32_t>(),
                                                            epoch.mutable_data_ptr<int32_t>(), static_cast<int>(chunk));
  HELIX_CUDA_LAUNCH_CHECK();
}

// CTAs of kHopbThreads for `work` grid-stride items: at least one (every CTA waits on the flags,
// which is what orders a later reuse of the peers' buffers), at most 8 per SM.
inline int grid_blocks(int64_t work, const LaunchContext& context) {
  return static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>((work + kHopbThreads - 1) / kHopbThreads, int64_t{context.multiprocessor_count} * 8)));
}

template <typename T>
void launch_combine(HopbCombineParams& params, bool vectorizable, const LaunchContext& context) {
  const cudaStream_t stream = context.stream;
  constexpr int kVec = 16 / sizeof(T);
  const int vec = vectorizable ? kVec : 1;
  const int blocks = grid_blocks(params.rows * (params.head_dim / vec), context);
  if (vectorizable) {
    HELIX_LAUNCH(blocks, kHopbThreads, 0, stream, hopb_combine_kernel<T, kVec>)(params);
  } else {
    HELIX_LAUNCH(blocks, kHopbThreads, 0, stream, hopb_combine_kernel<T, 1>)(params);
  }
  HELIX_CUDA_LAUNCH_CHECK();
}

// After the device-independent checks (check_hopb_combine_args, which gives rows, heads, dim).
inline std::tuple<at::Tensor, at::Tensor> combine(const std::vector<at::Tensor>& peer_out,
                                                  const std::vector<at::Tensor>& peer_lse,
                                                  const std::vector<at::Tensor>& peer_flags, const at::Tensor& epoch,
                                                  int64_t chunk, double timeout_s, at::Tensor& error, int64_t rows,
                                                  int64_t heads, int64_t dim, const LaunchContext& context) {
  at::Tensor out = at::empty({rows, heads, dim}, peer_out[0].options());
  at::Tensor lse = at::empty({rows, heads}, peer_out[0].options().dtype(at::kFloat));
  HopbCombineParams params{};
  const int64_t element = peer_out[0].element_size();
  bool vectorizable = (dim * element) % 16 == 0 && is_aligned(out.data_ptr(), 16);
  params.num_peers = static_cast<int>(peer_out.size());
  for (int p = 0; p < params.num_peers; ++p) {
    params.peer_out[p] = peer_out[p].const_data_ptr();
    params.peer_lse[p] = peer_lse[p].const_data_ptr<float>();
    params.peer_flags[p] = peer_flags[p].const_data_ptr<int32_t>();
    vectorizable = vectorizable && is_aligned(params.peer_out[p], 16);
  }
  params.epoch = epoch.const_data_ptr<int32_t>();
  params.error = error.mutable_data_ptr<int32_t>();
  params.out = out.mutable_data_ptr();
  params.out_lse = lse.mutable_data_ptr<float>();
  params.rows = rows * heads;
  params.head_dim = dim;
  params.timeout_ns = static_cast<uint64_t>(std::ceil(timeout_s * 1e9));
  params.chunk = static_cast<int>(chunk);
  // Every CTA waits on the flags, so launch even when there is nothing to merge: the wait is
  // what orders a later reuse of the peers' buffers.
  switch (out.scalar_type()) {
    case at::kFloat: launch_combine<float>(params, vectorizable, context); break;
    case at::kHalf: launch_combine<__half>(params, vectorizable, context); break;
    default: launch_combine<__nv_bfloat16>(params, vectorizable, context); break;
  }
  return {out, lse};
}

template <typename T>
void launch_all_reduce(HopbAllReduceParams& params, bool vectorizable, const LaunchContext& context) {
  constexpr int kVec = 16 / sizeof(T);
  const int vec = vectorizable ? kVec : 1;
  const int blocks = grid_blocks(params.numel / vec, context);
  if (vectorizable) {
    HELIX_LAUNCH(blocks, kHopbThreads, 0, context.stream, hopb_all_reduce_kernel<T, kVec>)(params);
  } else {
    HELIX_LAUNCH(blocks, kHopbThreads, 0, context.stream, hopb_all_reduce_kernel<T, 1>)(params);
  }
  HELIX_CUDA_LAUNCH_CHECK();
}

// After the device-independent checks (check_hopb_all_reduce_args, which gives numel).
inline at::Tensor all_reduce(const std::vector<at::Tensor>& peer_parts, const std::vector<at::Tensor>& peer_flags,
                             const at::Tensor& epoch, int64_t chunk, double timeout_s, at::Tensor& error,
                             int64_t numel, const LaunchContext& context) {
  at::Tensor out = at::empty(peer_parts[0].sizes(), peer_parts[0].options());
  HopbAllReduceParams params{};
  const int64_t element = peer_parts[0].element_size();
  bool vectorizable = (numel * element) % 16 == 0 && is_aligned(out.data_ptr(), 16);
  params.num_peers = static_cast<int>(peer_parts.size());
  for (int p = 0; p < params.num_peers; ++p) {
    params.peer_parts[p] = peer_parts[p].const_data_ptr();
    params.peer_flags[p] = peer_flags[p].const_data_ptr<int32_t>();
    vectorizable = vectorizable && is_aligned(params.peer_parts[p], 16);
  }
  params.epoch = epoch.const_data_ptr<int32_t>();
  params.error = error.mutable_data_ptr<int32_t>();
  params.out = out.mutable_data_ptr();
  params.numel = numel;
  params.timeout_ns = static_cast<uint64_t>(std::ceil(timeout_s * 1e9));
  params.chunk = static_cast<int>(chunk);
  // Launched even for numel = 0: the flag wait orders a later reuse of the peers' buffers.
  switch (out.scalar_type()) {
    case at::kFloat: launch_all_reduce<float>(params, vectorizable, context); break;
    case at::kHalf: launch_all_reduce<__half>(params, vectorizable, context); break;
    default: launch_all_reduce<__nv_bfloat16>(params, vectorizable, context); break;
  }
  return out;
}

}  // namespace hopb_launch
}  // namespace helix
