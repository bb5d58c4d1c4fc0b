// fp4_grouped_gemm launcher body, device-agnostic: plans the K splits from the SM count and the
// number of (expert, column tile) work units, then launches the torch-free kernel of
// helix/fp4_gemm_kernel.cuh once for every group (plus a deterministic split-K finalize). No
// host sync on offs and only allocator tensors: CUDA-graph capturable. Shared by the CUDA op
// (fp4_grouped_gemm.cu) and the SIMT host runtime's (csrc/simt/ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <mutex>

#include "cuda/launch_context.h"
#include "fp4_args.h"
#include "helix/fp4_gemm_kernel.cuh"

namespace helix {
namespace fp4_grouped_gemm_launch {

// Raises an instance's dynamic shared-memory limit (once per device) and returns its occupancy.
template <int M_TILES>
int gemm_ctas_per_sm(int device) {
  static std::mutex mutex;
  static int cached[64] = {};
  const std::lock_guard<std::mutex> lock(mutex);
  if (device >= 0 && device < 64 && cached[device] > 0) return cached[device];
  constexpr size_t smem = fp4_gemm_smem_bytes(M_TILES);
  HELIX_CUDA_CHECK(cudaFuncSetAttribute(fp4_grouped_gemm_kernel<M_TILES>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  int ctas = 0;
  HELIX_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, fp4_grouped_gemm_kernel<M_TILES>,
                                                               kFp4GemmThreads, smem));
  TORCH_CHECK(ctas >= 1, "fp4_grouped_gemm: the kernel's ", smem, " bytes of shared memory per block do not fit this GPU");
  if (device >= 0 && device < 64) cached[device] = ctas;
  return ctas;
}

// After the device-independent checks (check_fp4_grouped_gemm_args).
inline at::Tensor run(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& w_scales_in,
                      const at::Tensor& w_global_scale, const at::Tensor& offs, const Fp4Format& format,
                      const GroupedGemmShape& shape, const LaunchContext& context) {
  TORCH_CHECK(shape.tokens <= INT32_MAX && shape.k <= INT32_MAX && shape.n <= INT32_MAX && shape.num_experts <= 65535,
              "fp4_grouped_gemm: sizes out of range for the CUDA kernel: T = ", shape.tokens, ", K = ", shape.k,
              ", N = ", shape.n, ", E = ", shape.num_experts);
  // x rows may be strided if every row starts 16-byte aligned; the weights are read as packed
  // rows from a 16-byte-aligned base. Anything else is copied (clone: a contiguous view at a
  // misaligned address would come back from contiguous() unchanged).
  const bool x_usable = x_in.stride(1) == 1 && (x_in.stride(0) * 2) % 16 == 0 && is_aligned(x_in.data_ptr(), 16);
  const at::Tensor x = x_usable ? x_in : x_in.clone(at::MemoryFormat::Contiguous);
  const at::Tensor w = w_in.is_contiguous() && is_aligned(w_in.data_ptr(), 16) ? w_in
                                                                               : w_in.clone(at::MemoryFormat::Contiguous);
  const at::Tensor w_scales = w_scales_in.contiguous();
  const at::Tensor w_global = w_global_scale.contiguous(), ends = offs.contiguous();

  Fp4GemmParams params{};
  params.x = reinterpret_cast<const __nv_bfloat16*>(x.const_data_ptr());
  params.x_stride_row = x.stride(0);
  params.w = w.const_data_ptr<uint8_t>();
  params.w_scales = static_cast<const uint8_t*>(w_scales.const_data_ptr());
  params.w_global = w_global.const_data_ptr<float>();
  params.offs = ends.const_data_ptr<int32_t>();
  params.tokens = static_cast<int>(shape.tokens);
  params.k = static_cast<int>(shape.k);
  params.n = static_cast<int>(shape.n);
  params.num_experts = static_cast<int>(shape.num_experts);
  params.nvfp4 = format.nvfp4;
  params.rows_16b_aligned = (shape.k / 2) % 16 == 0;
  params.n_tiles = static_cast<int>((shape.n + kFp4GemmTileN - 1) / kFp4GemmTileN);
  const int total_chunks = static_cast<int>((shape.k + kFp4GemmChunk - 1) / kFp4GemmChunk);

  const int device = context.device;
  const cudaStream_t stream = context.stream;
  if (shape.tokens == 0 || shape.n == 0 || shape.k == 0) return at::zeros({shape.tokens, shape.n}, x.options());

  // With T <= 16 no group can exceed one 16-row mma tile: the lean single-tile instance.
  const bool single_tile = shape.tokens <= 16;
  // Split K only at decode sizes (T <= 64) and only when the (expert, column tile) units
  // cannot fill one wave of the GPU; the host does not know which groups are empty (that
  // would be a sync), so it assumes none. Prefill-sized T has work enough per unit.
  const int64_t units = shape.num_experts * int64_t{params.n_tiles};
  const int ctas_per_sm = single_tile ? gemm_ctas_per_sm<1>(device) : gemm_ctas_per_sm<4>(device);
  const int64_t target = int64_t{context.multiprocessor_count} * std::max(2, ctas_per_sm);
  int k_splits = units >= target || shape.tokens > 64
                     ? 1
                     : static_cast<int>(std::min<int64_t>((target + units - 1) / units, 32));
  k_splits = std::max(1, std::min(k_splits, total_chunks));
  params.chunks_per_split = (total_chunks + k_splits - 1) / k_splits;
  params.k_splits = (total_chunks + params.chunks_per_split - 1) / params.chunks_per_split;
  params.k_splits = std::max(1, params.k_splits);

  at::Tensor y;
  at::Tensor partial;
  if (params.k_splits == 1) {
    y = at::zeros({shape.tokens, shape.n}, x.options());  // rows past offs[-1] stay zero
  } else {
    y = at::empty({shape.tokens, shape.n}, x.options());
    partial = at::empty({params.k_splits, shape.tokens, shape.n}, x.options().dtype(at::kFloat));
    params.partial = partial.mutable_data_ptr<float>();
  }
  params.y = reinterpret_cast<__nv_bfloat16*>(y.mutable_data_ptr());
  const dim3 grid(params.n_tiles * params.k_splits, params.num_experts);
  if (single_tile) {
    HELIX_LAUNCH(grid, kFp4GemmThreads, fp4_gemm_smem_bytes(1), stream, fp4_grouped_gemm_kernel<1>)(params);
  } else {
    HELIX_LAUNCH(grid, kFp4GemmThreads, fp4_gemm_smem_bytes(4), stream, fp4_grouped_gemm_kernel<4>)(params);
  }
  HELIX_CUDA_LAUNCH_CHECK();
  if (params.k_splits > 1) {
    const int64_t blocks = std::min<int64_t>((shape.tokens * shape.n + 255) / 256, int64_t{context.multiprocessor_count} * 32);
    HELIX_LAUNCH(static_cast<int>(blocks), 256, 0, stream, fp4_grouped_gemm_finalize_kernel)(params);
    HELIX_CUDA_LAUNCH_CHECK();
  }
  return y;
}

}  // namespace fp4_grouped_gemm_launch
}  // namespace helix
