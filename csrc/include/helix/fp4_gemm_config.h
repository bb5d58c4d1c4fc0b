// Tile shape and shared memory of the FP4 grouped GEMM kernel (torch-free; shared by the
// kernel, its launcher and the static kernel report).
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace helix {

constexpr int kFp4GemmThreads = 128;
constexpr int kFp4GemmTileN = 128;      // output columns per CTA (32 per warp)
constexpr int kFp4GemmChunk = 128;      // K elements per pipeline step
constexpr int kFp4GemmStages = 3;       // activation chunks in flight (shared memory)
constexpr int kFp4GemmXRow = kFp4GemmChunk + 8;  // padded shared-memory row (elements)
constexpr size_t kFp4GemmLutBytes = 256 * 32 * sizeof(uint32_t);

// Shared memory of the kernel that handles M_TILES * 16 activation rows per pass (bf16 rows).
constexpr size_t fp4_gemm_smem_bytes(int m_tiles) {
  return kFp4GemmLutBytes + size_t(kFp4GemmStages) * 16 * m_tiles * kFp4GemmXRow * 2;
}

}  // namespace helix
