// merge_states launcher bodies, device-agnostic: parameters and the torch-free launch of
// helix/merge_states_kernel.cuh, for the op and for flash_decode's split merge. Shared by the CUDA op (merge_states.cu) and the SIMT host
// runtime's (csrc/simt/ops.cpp), so the emulated launch is the real one.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "cuda/launch_context.h"
#include "helix/merge_states_kernel.cuh"
#include "merge_states_args.h"

namespace helix {

// Kernel parameters of the merge of parts_out [P, B, H, D] / parts_lse [P, B, H] (any strides)
// into out [B, H, D] / out_lse [B, H] (contiguous).
inline MergeStatesParams merge_states_params(const at::Tensor& parts_out, const at::Tensor& parts_lse,
                                             at::Tensor& out, at::Tensor& out_lse) {
  MergeStatesParams params{};
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
  return params;
}

// merge_states: parts and out in one dtype; out/out_lse allocated by
// allocate_merge_states_outputs, non-empty.
inline void launch_merge_states_op(const at::Tensor& parts_out, const at::Tensor& parts_lse, at::Tensor& out,
                                   at::Tensor& out_lse, const LaunchContext& context) {
  const MergeStatesParams params = merge_states_params(parts_out, parts_lse, out, out_lse);
  const int sms = context.multiprocessor_count;
  const cudaStream_t stream = context.stream;
  switch (parts_out.scalar_type()) {
    case at::kFloat: HELIX_CUDA_CHECK((launch_merge_states<float, float>(params, sms, stream))); break;
    case at::kHalf: HELIX_CUDA_CHECK((launch_merge_states<__half, __half>(params, sms, stream))); break;
    case at::kBFloat16:
      HELIX_CUDA_CHECK((launch_merge_states<__nv_bfloat16, __nv_bfloat16>(params, sms, stream)));
      break;
    default: TORCH_CHECK(false, "merge_states: unsupported parts_out dtype ", parts_out.scalar_type());
  }
}

// flash_decode's split merge: fp32 partials [splits, B, Hq, Dv] into out in q's dtype (bf16/fp16).
inline void launch_split_merge(const at::Tensor& partial_out, const at::Tensor& partial_lse, at::Tensor& out,
                               at::Tensor& out_lse, const LaunchContext& context) {
  const MergeStatesParams params = merge_states_params(partial_out, partial_lse, out, out_lse);
  if (out.scalar_type() == at::kBFloat16) {
    HELIX_CUDA_CHECK((launch_merge_states<float, __nv_bfloat16>(params, context.multiprocessor_count, context.stream)));
  } else {
    HELIX_CUDA_CHECK((launch_merge_states<float, __half>(params, context.multiprocessor_count, context.stream)));
  }
}

}  // namespace helix
