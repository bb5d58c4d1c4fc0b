// HOP-B fused combine, CUDA launchers: hopb_signal (one thread: epoch + release flag) and
// hopb_combine (flag waits, then the merge of peer partials read over peer memory). The peer
// views come from torch's symmetric memory (FusedExchange); their addresses travel as kernel
// parameters, so a captured CUDA graph replays them without any host work.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "cuda_utils.h"
#include "helix/hopb_combine_kernel.cuh"
#include "hopb_args.h"

namespace helix {
namespace {

void hopb_signal_cuda(at::Tensor& flags, at::Tensor& epoch, int64_t chunk) {
  check_hopb_signal_args(flags, epoch, chunk);
  TORCH_CHECK(flags.is_cuda(), "hopb_signal: flags must be a CUDA tensor here");
  const c10::cuda::CUDAGuard device_guard(flags.device());
  hopb_signal_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream(flags.get_device())>>>(
      flags.mutable_data_ptr<int32_t>(), epoch.mutable_data_ptr<int32_t>(), static_cast<int>(chunk));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_combine(HopbCombineParams& params, bool vectorizable, int device, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int vec = vectorizable ? kVec : 1;
  const int64_t work = params.rows * (params.head_dim / vec);
  const int blocks = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>((work + kHopbThreads - 1) / kHopbThreads, int64_t{multiprocessor_count(device)} * 8)));
  if (vectorizable) {
    hopb_combine_kernel<T, kVec><<<blocks, kHopbThreads, 0, stream>>>(params);
  } else {
    hopb_combine_kernel<T, 1><<<blocks, kHopbThreads, 0, stream>>>(params);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> hopb_combine_cuda(const std::vector<at::Tensor>& peer_out,
                                                     const std::vector<at::Tensor>& peer_lse,
                                                     const std::vector<at::Tensor>& peer_flags,
                                                     const at::Tensor& epoch, int64_t chunk, double timeout_s,
                                                     at::Tensor& error) {
  const auto [rows, heads, dim] =
      check_hopb_combine_args(peer_out, peer_lse, peer_flags, epoch, chunk, timeout_s, error);
  TORCH_CHECK(peer_out[0].is_cuda(), "hopb_combine: the peer views must be CUDA tensors here");
  const c10::cuda::CUDAGuard device_guard(peer_out[0].device());
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
  const int device = out.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  // Every CTA waits on the flags, so launch even when there is nothing to merge: the wait is
  // what orders a later reuse of the peers' buffers.
  switch (out.scalar_type()) {
    case at::kFloat: launch_combine<float>(params, vectorizable, device, stream); break;
    case at::kHalf: launch_combine<__half>(params, vectorizable, device, stream); break;
    default: launch_combine<__nv_bfloat16>(params, vectorizable, device, stream); break;
  }
  return {out, lse};
}

}  // namespace
}  // namespace helix

TORCH_LIBRARY_IMPL(helix, CUDA, m) {
  m.impl("hopb_signal", &helix::hopb_signal_cuda);
  m.impl("hopb_combine", &helix::hopb_combine_cuda);
}
