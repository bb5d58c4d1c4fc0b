// The compiled configurations of the flash_decode kernel, one per head-dim family, each
// instantiated in its own .cu file (flash_decode_d64.cu, ...) so that ninja compiles them
// in parallel. Torch-free: the launcher in flash_decode.cu picks one and plans the grid.
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>

#include "helix/flash_decode_kernel.cuh"

namespace helix {

struct FlashDecodeKernelInfo {
  int heads_per_cta;  // query heads one CTA computes (a head tile)
  int tile_tokens;    // tokens per pipeline tile (a split is a whole number of tiles)
  int threads;
  size_t smem_bytes;
  int ctas_per_sm;  // occupancy at smem_bytes
};

struct FlashDecodeVariant {
  // Raises the kernel's dynamic shared-memory limit on `device` and reports its occupancy.
  cudaError_t (*prepare)(int device, FlashDecodeKernelInfo* info);
  cudaError_t (*launch)(const FlashDecodeParams& params, const FlashDecodeKernelInfo& info, cudaStream_t stream);
};

// (Dk, Dv) = (64, 64), (128, 128), (256, 256) with separate K and V caches, and (576, 512)
// for MLA (V = the first 512 dims of the K entry). bf16 selects bf16 (else fp16) compute;
// fp8 selects float8_e4m3fn caches.
FlashDecodeVariant flash_decode_variant_d64(bool bf16, bool fp8);
FlashDecodeVariant flash_decode_variant_d128(bool bf16, bool fp8);
FlashDecodeVariant flash_decode_variant_d256(bool bf16, bool fp8);
FlashDecodeVariant flash_decode_variant_mla(bool bf16, bool fp8);

template <typename Config, typename T, bool FP8>
struct FlashDecodeInstance {
  // ctas_per_sm = 0 reports a GPU whose shared memory per block is too small for this kernel.
  static cudaError_t prepare(int device, FlashDecodeKernelInfo* info) {
    constexpr size_t smem = Config::smem_bytes(FP8);
    const auto kernel = flash_decode_kernel<Config, T, FP8>;
    *info = {Config::kHeadsPerCta, Config::kTile, Config::kThreads, smem, 0};
    int limit = 0;
    cudaError_t status = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (status != cudaSuccess || smem > static_cast<size_t>(limit)) return status;
    status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (status != cudaSuccess) return status;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&info->ctas_per_sm, kernel, Config::kThreads, smem);
  }

  static cudaError_t launch(const FlashDecodeParams& params, const FlashDecodeKernelInfo& info, cudaStream_t stream) {
    const dim3 grid(params.head_tiles * params.num_splits, params.batch, params.num_kv_heads);
    HELIX_LAUNCH(grid, info.threads, info.smem_bytes, stream, flash_decode_kernel<Config, T, FP8>)(params);
    return cudaGetLastError();
  }

  static FlashDecodeVariant variant() { return {&prepare, &launch}; }
};

template <typename Config>
FlashDecodeVariant select_flash_decode_variant(bool bf16, bool fp8) {
  if (bf16) {
    return fp8 ? FlashDecodeInstance<Config, __nv_bfloat16, true>::variant()
               : FlashDecodeInstance<Config, __nv_bfloat16, false>::variant();
  }
  return fp8 ? FlashDecodeInstance<Config, __half, true>::variant() : FlashDecodeInstance<Config, __half, false>::variant();
}

}  // namespace helix
