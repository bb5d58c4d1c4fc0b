// Launch facts of every CUDA kernel configuration, read from the same constexprs the
// launchers use (threads per CTA, dynamic shared memory, tile shapes), for
// bench/kernels_report.py's napkin math. No device is touched.
#include <pybind11/pybind11.h>

#include "flash_decode_variants.h"
#include "helix/fp4_gemm_config.h"
#include "helix/fp4_quantize_kernel.cuh"
#include "helix/hopb.h"
#include "helix/merge_states_kernel.cuh"
#include "kernel_info.h"

namespace helix {
namespace {

template <typename Config>
pybind11::dict flash_decode_config(const char* name) {
  pybind11::dict info;
  info["name"] = name;
  info["threads"] = Config::kThreads;
  info["heads_per_cta"] = Config::kHeadsPerCta;
  info["tile_tokens"] = Config::kTile;
  info["stages"] = Config::kStages;
  info["dynamic_smem"] = Config::smem_bytes(false);
  info["dynamic_smem_fp8"] = Config::smem_bytes(true);
  return info;
}

}  // namespace

pybind11::dict kernel_launch_info() {
  pybind11::dict info;
  pybind11::list flash_decode;
  flash_decode.append(flash_decode_config<FlashDecodeConfig<64, 64, 1, 1, 4, 64, 3, false>>("d64"));
  flash_decode.append(flash_decode_config<FlashDecodeConfig<128, 128, 1, 1, 4, 64, 3, false>>("d128"));
  flash_decode.append(flash_decode_config<FlashDecodeConfig<256, 256, 1, 1, 4, 64, 2, false>>("d256"));
  flash_decode.append(flash_decode_config<FlashDecodeConfig<576, 512, 4, 2, 1, 32, 3, true>>("mla"));
  info["flash_decode"] = flash_decode;
  pybind11::dict merge;
  merge["threads"] = kMergeStatesThreads;
  merge["parts_in_flight"] = kMergeStatesPartsInFlight;
  info["merge_states"] = merge;
  pybind11::dict gemm;
  gemm["threads"] = kFp4GemmThreads;
  gemm["tile_n"] = kFp4GemmTileN;
  gemm["chunk_k"] = kFp4GemmChunk;
  gemm["stages"] = kFp4GemmStages;
  gemm["dynamic_smem_m1"] = fp4_gemm_smem_bytes(1);
  gemm["dynamic_smem_m4"] = fp4_gemm_smem_bytes(4);
  info["fp4_grouped_gemm"] = gemm;
  pybind11::dict quantize;
  quantize["threads"] = kFp4Threads;
  info["fp4_quantize"] = quantize;
  pybind11::dict hopb;
  hopb["threads"] = kHopbThreads;
  hopb["max_peers"] = kHopbMaxPeers;
  info["hopb_combine"] = hopb;
  return info;
}

}  // namespace helix
