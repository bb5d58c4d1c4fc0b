// merge_states, CUDA launcher: checks arguments and launches the torch-free kernel of
// helix/merge_states_kernel.cuh on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_utils.h"

#include "helix/merge_states_kernel.cuh"
#include "merge_states_args.h"

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

  MergeStatesParams params;
  params.parts_out = parts_out.const_data_ptr();
  params.parts_lse = parts_lse.const_data_ptr<float>();
  params.out = out.mutable_data_ptr();
  params.out_lse = out_lse.mutable_data_ptr<float>();
  params.num_parts = static_cast<int>(parts_out.size(0));
  params.num_heads = static_cast<int>(parts_out.size(2));
  params.head_dim = parts_out.size(3);
  params.num_rows = parts_out.size(1) * parts_out.size(2);
  params.out_stride_part = parts_out.stride(0);
  params.out_stride_batch = parts_out.stride(1);
  params.out_stride_head = parts_out.stride(2);
  params.out_stride_dim = parts_out.stride(3);
  params.lse_stride_part = parts_lse.stride(0);
  params.lse_stride_batch = parts_lse.stride(1);
  params.lse_stride_head = parts_lse.stride(2);

  const int device = parts_out.get_device();
  const int sms = multiprocessor_count(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  switch (parts_out.scalar_type()) {
    case at::kFloat: C10_CUDA_CHECK((launch_merge_states<float, float>(params, sms, stream))); break;
    case at::kHalf: C10_CUDA_CHECK((launch_merge_states<__half, __half>(params, sms, stream))); break;
    case at::kBFloat16:
      C10_CUDA_CHECK((launch_merge_states<__nv_bfloat16, __nv_bfloat16>(params, sms, stream)));
      break;
    default: TORCH_CHECK(false, "merge_states: unsupported parts_out dtype ", parts_out.scalar_type());
  }
  return {out, out_lse};
}

}  // namespace
}  // namespace helix

TORCH_LIBRARY_IMPL(helix, CUDA, m) { m.impl("merge_states", &helix::merge_states_cuda); }
