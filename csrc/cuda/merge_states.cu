// merge_states, CUDA launcher: checks arguments, picks the vector or scalar instance of
// the torch-free kernel in helix/merge_states_kernel.cuh and launches it on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_utils.h"

#include "helix/merge_states_kernel.cuh"
#include "merge_states_args.h"

namespace helix {
namespace {

bool is_aligned(const void* pointer, int bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % bytes == 0;
}

template <typename T, int VEC>
void launch_merge_states(const MergeStatesParams& params, int device, cudaStream_t stream) {
  const int64_t total_threads = params.num_rows * (params.head_dim / VEC);
  const int64_t blocks_needed = (total_threads + kMergeStatesThreads - 1) / kMergeStatesThreads;
  // The kernel is grid-stride, so very large problems reuse a bounded grid.
  const int max_blocks = multiprocessor_count(device) * 64;
  const int blocks = static_cast<int>(std::min<int64_t>(blocks_needed, max_blocks));
  merge_states_kernel<T, VEC><<<blocks, kMergeStatesThreads, 0, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dispatch_merge_states(const MergeStatesParams& params, int device, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  // The 16-byte path needs whole, aligned vectors along D for every (p, b, h).
  const bool vectorizable = params.out_stride_dim == 1 && params.head_dim % kVec == 0 &&
                            params.out_stride_part % kVec == 0 &&
                            params.out_stride_batch % kVec == 0 &&
                            params.out_stride_head % kVec == 0 &&
                            is_aligned(params.parts_out, 16) && is_aligned(params.out, 16);
  if (vectorizable) {
    launch_merge_states<T, kVec>(params, device, stream);
  } else {
    launch_merge_states<T, 1>(params, device, stream);
  }
}

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
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  switch (parts_out.scalar_type()) {
    case at::kFloat: dispatch_merge_states<float>(params, device, stream); break;
    case at::kHalf: dispatch_merge_states<__half>(params, device, stream); break;
    case at::kBFloat16: dispatch_merge_states<__nv_bfloat16>(params, device, stream); break;
    default: TORCH_CHECK(false, "merge_states: unsupported parts_out dtype ", parts_out.scalar_type());
  }
  return {out, out_lse};
}

}  // namespace
}  // namespace helix

TORCH_LIBRARY_IMPL(helix, CUDA, m) { m.impl("merge_states", &helix::merge_states_cuda); }
