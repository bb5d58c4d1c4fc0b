// merge_states, CUDA op: device checks, then the shared launcher body (merge_states_launch.h)
// on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_utils.h"
#include "merge_states_launch.h"

namespace helix {
namespace {

std::tuple<at::Tensor, at::Tensor> merge_states_cuda(const at::Tensor& parts_out,
                                                     const at::Tensor& parts_lse) {
  check_merge_states_args(parts_out, parts_lse);
  TORCH_CHECK(parts_out.is_cuda(), "merge_states: parts_out must be a CUDA tensor here, got ",
              parts_out.device());
  const c10::cuda::CUDAGuard device_guard(parts_out.device());
  auto [out, out_lse] = allocate_merge_states_outputs(parts_out);
  if (out.numel() == 0) return {out, out_lse};
  launch_merge_states_op(parts_out, parts_lse, out, out_lse, launch_context(parts_out.get_device()));
  return {out, out_lse};
}

}  // namespace
}  // namespace helix

TORCH_LIBRARY_IMPL(helix, CUDA, m) { m.impl("merge_states", &helix::merge_states_cuda); }
