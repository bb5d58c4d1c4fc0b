// HOP-B fused combine, CUDA ops: device checks, then the shared launcher bodies
// (hopb_combine_launch.h) on the current stream. The peer views come from torch's symmetric
// memory (FusedExchange).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_utils.h"
#include "hopb_combine_launch.h"

namespace helix {
namespace {

void hopb_signal_cuda(at::Tensor& flags, at::Tensor& epoch, int64_t chunk) {
  check_hopb_signal_args(flags, epoch, chunk);
  TORCH_CHECK(flags.is_cuda(), "hopb_signal: flags must be a CUDA tensor here");
  const c10::cuda::CUDAGuard device_guard(flags.device());
  hopb_launch::signal(flags, epoch, chunk, launch_context(flags.get_device()));
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
  return hopb_launch::combine(peer_out, peer_lse, peer_flags, epoch, chunk, timeout_s, error, rows, heads, dim,
                              launch_context(peer_out[0].get_device()));
}

at::Tensor hopb_all_reduce_cuda(const std::vector<at::Tensor>& peer_parts, const std::vector<at::Tensor>& peer_flags,
                                const at::Tensor& epoch, int64_t chunk, double timeout_s, at::Tensor& error) {
  const int64_t numel = check_hopb_all_reduce_args(peer_parts, peer_flags, epoch, chunk, timeout_s, error);
  TORCH_CHECK(peer_parts[0].is_cuda(), "hopb_all_reduce: the peer views must be CUDA tensors here");
  const c10::cuda::CUDAGuard device_guard(peer_parts[0].device());
  return hopb_launch::all_reduce(peer_parts, peer_flags, epoch, chunk, timeout_s, error, numel,
                                 launch_context(peer_parts[0].get_device()));
}

}  // namespace
}  // namespace helix

TORCH_LIBRARY_IMPL(helix, CUDA, m) {
  m.impl("hopb_signal", &helix::hopb_signal_cuda);
  m.impl("hopb_combine", &helix::hopb_combine_cuda);
  m.impl("hopb_all_reduce", &helix::hopb_all_reduce_cuda);
}
