// FP4 grouped GEMM, CUDA (torch-free): y[rows of e] = x[rows of e] @ dequant(w[e]).T * g[e].
//
// Built for weight streaming at decode sizes (1 to 64 tokens per expert). Grid: x = n tile
// + k split * n_tiles, y = expert; one launch for every group, CTAs of empty groups return
// at once (the group bounds are read from offs on the device: no host sync).
//
// A CTA (4 warps) owns 128 output columns of one expert and one K range; warp w owns 32
// columns, as 4 mma n8 tiles. Weights go from global memory straight to registers (each
// byte is used by one thread): 16-byte loads, one chunk of 128 K-elements ahead. The
// K-order inside a chunk is permuted so that every thread's fragments are contiguous:
// lane (g, t) (g = lane / 4, t = lane % 4) loads bytes [16t, 16t + 16) of its weight row,
// i.e. K-elements [32t, 32t + 32), and mma k-step s takes elements 32t + 4s .. 32t + 4s + 3
// of them; the activations are read from shared memory with the same permutation, so the
// dot products are unchanged (a sum does not care about the order of its terms).
// Dequantization: a 256-entry byte -> bf16x2 table (both nibbles at once, exact E2M1
// values), replicated per lane so lookups never conflict, times the block scale (an exact
// bf16 product). mma.sync m16n8k16 bf16 with fp32 accumulators; the activations of up to
// M_TILES * 16 rows share each dequantized weight fragment (M_TILES = 1 when no group can
// exceed 16 rows, i.e. T <= 16, the usual decode case; 4 otherwise, looping over passes of
// 64 rows for prefill-sized groups).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "helix/fp4.h"
#include "helix/fp4_gemm_config.h"
#include "helix/mma.cuh"

namespace helix {

struct Fp4GemmParams {
  const __nv_bfloat16* x;  // [T, K], rows strided by x_stride_row, K contiguous
  int64_t x_stride_row;
  const uint8_t* w;         // [E, N, K/2] contiguous
  const uint8_t* w_scales;  // [E, N, K/block] contiguous: e4m3 (NVFP4) or e8m0 (MXFP4) codes
  const float* w_global;    // [E]
  const int32_t* offs;      // [E] cumulative group ends
  __nv_bfloat16* y;         // [T, N]: written directly when k_splits == 1
  float* partial;           // [k_splits, T, N]: fp32 partial sums when k_splits > 1
  int tokens, k, n, num_experts;
  int n_tiles, k_splits, chunks_per_split;
  bool nvfp4;
  bool rows_16b_aligned;  // K/2 % 16 == 0: weight rows allow 16-byte loads
};


namespace detail {

HELIX_DEVICE uint32_t bf16_pair_bits(float low, float high) { return ptx::pack_pair<__nv_bfloat16>(low, high); }

// bf16x2 product (exact here: E2M1 values times an E4M3 or power-of-two scale).
HELIX_DEVICE uint32_t multiply_bf16_pairs(uint32_t a, uint32_t b) {
  const __nv_bfloat162 product =
      __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
  return *reinterpret_cast<const uint32_t*>(&product);
}

// Block scale as a bf16 pair (both halves equal). E4M3 values are exact in bf16; an E8M0
// code c is 2^(c-127), i.e. the bf16 bit pattern c << 7, except code 0: 2^-127 is the bf16
// subnormal 0x0040 (as in the shared codec: the products with E2M1 values stay exact), and
// 0xFF, NaN.
HELIX_DEVICE uint32_t scale_pair(uint32_t code, bool nvfp4) {
  const float value = nvfp4 ? fp8_e4m3_to_float(static_cast<uint8_t>(code)) : 0.0f;
  code &= 0xFFu;
  const uint32_t e8m0 = code == 0xFFu ? kQuietNanBitsBf16 : code == 0 ? 0x0040u : (code << 7);
  const uint32_t bits = nvfp4 ? (bf16_pair_bits(value, value) & 0xFFFFu) : e8m0;
  return bits | (bits << 16);
}

// One chunk of one weight row segment: 32 FP4 values (16 bytes) and their scale codes.
struct WeightSegment {
  uint4 bytes;
  uint32_t scale_codes;  // NVFP4: two codes (elements 0-15, 16-31); MXFP4: one
};

}  // namespace detail

template <int M_TILES>
__global__ void __launch_bounds__(kFp4GemmThreads) fp4_grouped_gemm_kernel(const Fp4GemmParams params) {
  constexpr int ROWS = 16 * M_TILES;  // activation rows per pass
  HELIX_DYNAMIC_SHARED(unsigned char, shared);
  uint32_t* lut = reinterpret_cast<uint32_t*>(shared);
  __nv_bfloat16* x_stages = reinterpret_cast<__nv_bfloat16*>(shared + kFp4GemmLutBytes);

  const int n_tile = blockIdx.x % params.n_tiles, split = blockIdx.x / params.n_tiles;
  const int expert = blockIdx.y;
  // Group bounds, clamped so that unchecked offs can never address outside x or y.
  int row_begin = expert == 0 ? 0 : params.offs[expert - 1];
  int row_end = params.offs[expert];
  row_begin = row_begin < 0 ? 0 : (row_begin > params.tokens ? params.tokens : row_begin);
  row_end = row_end < row_begin ? row_begin : (row_end > params.tokens ? params.tokens : row_end);
  if (row_begin == row_end) return;  // uniform for the CTA

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group_row = lane / 4, quad = lane % 4;
  const int total_chunks = (params.k + kFp4GemmChunk - 1) / kFp4GemmChunk;
  const int chunk_begin = split * params.chunks_per_split;
  const int chunk_end = min(chunk_begin + params.chunks_per_split, total_chunks);
  const int chunks = chunk_end > chunk_begin ? chunk_end - chunk_begin : 0;  // may be 0: partials are then 0
  const int scales_per_row = params.k / (params.nvfp4 ? kNvfp4Block : kMxfp4Block);

  // The byte -> bf16x2 table, one copy per lane (entry (b, l) at word b * 32 + l).
  for (int index = threadIdx.x; index < 256 * 32; index += kFp4GemmThreads) {
    const int byte = index / 32;
    lut[index] = detail::bf16_pair_bits(e2m1_to_float(byte & 0xF), e2m1_to_float(byte >> 4));
  }

  // This thread's 4 weight rows (one per n8 tile, 8 rows apart) and their K segment.
  const int n_base = n_tile * kFp4GemmTileN + warp * 32 + group_row;
  const int64_t first_row = int64_t{expert} * params.n + n_base;
  const uint8_t* weight_row0 = params.w + first_row * (params.k / 2);
  const uint8_t* scale_row0 = params.w_scales + first_row * scales_per_row;

  auto load_segments = [&](int chunk, detail::WeightSegment (&segments)[4]) {
    const int element = chunk * kFp4GemmChunk + 32 * quad;  // first K element of the segment
    const int valid = params.k - element;                   // >= 32: whole; 16: half (NVFP4 only)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      segments[j].bytes = make_uint4(0, 0, 0, 0);
      segments[j].scale_codes = 0;
      if (n_base + 8 * j >= params.n || valid <= 0) continue;
      const uint8_t* source = weight_row0 + int64_t{8 * j} * (params.k / 2) + element / 2;
      const uint8_t* scale_row = scale_row0 + 8 * j * scales_per_row;
      if (valid >= 32 && params.rows_16b_aligned) {
        segments[j].bytes = __ldcs(reinterpret_cast<const uint4*>(source));
      } else {
        const uint2 low = __ldcs(reinterpret_cast<const uint2*>(source));
        const uint2 high = valid >= 32 ? __ldcs(reinterpret_cast<const uint2*>(source + 8)) : make_uint2(0, 0);
        segments[j].bytes = make_uint4(low.x, low.y, high.x, high.y);
      }
      if (params.nvfp4) {
        const uint8_t* codes = scale_row + element / kNvfp4Block;
        segments[j].scale_codes = codes[0] | (valid >= 32 ? uint32_t{codes[1]} << 8 : 0u);
      } else {
        segments[j].scale_codes = scale_row[element / kMxfp4Block];
      }
    }
  };

  const float global_scale = params.w_global[expert];
  for (int pass_begin = row_begin; pass_begin < row_end; pass_begin += ROWS) {
    const int pass_rows = min(ROWS, row_end - pass_begin);
    const int m_tiles = (pass_rows + 15) / 16;

    // Activation chunk -> shared stage: pass_rows x 128 (zeros past the rows or K).
    auto load_x = [&](int chunk_index) {
      if (chunk_index < chunks) {
        __nv_bfloat16* stage = x_stages + (chunk_index % kFp4GemmStages) * ROWS * kFp4GemmXRow;
        const int element0 = (chunk_begin + chunk_index) * kFp4GemmChunk;
        for (int piece = threadIdx.x; piece < ROWS * (kFp4GemmChunk / 8); piece += kFp4GemmThreads) {
          const int row = piece / (kFp4GemmChunk / 8), column = (piece % (kFp4GemmChunk / 8)) * 8;
          const bool valid = row < pass_rows && element0 + column < params.k;
          const __nv_bfloat16* source =
              valid ? params.x + int64_t{pass_begin + row} * params.x_stride_row + element0 + column : params.x;
          ptx::cp_async_16(ptx::shared_address(stage + row * kFp4GemmXRow + column), source, valid);
        }
      }
      ptx::cp_async_commit();
    };

    float accumulator[M_TILES][4][4];  // [m tile][n8 tile][fragment]
#pragma unroll
    for (int m = 0; m < M_TILES; ++m) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) accumulator[m][j][i] = 0.0f;
      }
    }

    __syncthreads();  // the table is written; the previous pass no longer reads the stages
#pragma unroll
    for (int s = 0; s < kFp4GemmStages - 1; ++s) load_x(s);
    detail::WeightSegment current[4], next[4];
    load_segments(chunk_begin, current);

    for (int chunk = 0; chunk < chunks; ++chunk) {
      ptx::cp_async_wait<kFp4GemmStages - 2>();
      __syncthreads();  // activation chunk landed for all; the slot reloaded next is free
      load_x(chunk + kFp4GemmStages - 1);
      if (chunk + 1 < chunks) load_segments(chunk_begin + chunk + 1, next);

      const __nv_bfloat16* stage = x_stages + (chunk % kFp4GemmStages) * ROWS * kFp4GemmXRow;
      uint32_t scales[4][2];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        scales[j][0] = detail::scale_pair(current[j].scale_codes & 0xFFu, params.nvfp4);
        scales[j][1] = params.nvfp4 ? detail::scale_pair(current[j].scale_codes >> 8, true) : scales[j][0];
      }
      // Word `w` of a segment (4 bytes, 8 K-elements) feeds k-steps 2w and 2w + 1. The word
      // loop is not unrolled: unrolled, sm_90a code generation hoists the table lookups of
      // all eight k-steps and runs out of registers.
#pragma unroll 1
      for (int word_index = 0; word_index < 4; ++word_index) {
        uint32_t words[4], scale_of_word[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint4 bytes = current[j].bytes;
          words[j] = word_index == 0 ? bytes.x : word_index == 1 ? bytes.y : word_index == 2 ? bytes.z : bytes.w;
          scale_of_word[j] = word_index < 2 ? scales[j][0] : scales[j][1];  // NVFP4: elements 0-15 | 16-31
        }
#pragma unroll
        for (int half_word = 0; half_word < 2; ++half_word) {
          const int step = 2 * word_index + half_word;
          // Activations: rows group_row (+8) of each m tile, K elements 32 * quad + 4 * step ...
          uint32_t a[M_TILES][4];
#pragma unroll
          for (int m = 0; m < M_TILES; ++m) {
            if (m < m_tiles) {
              const __nv_bfloat16* row0 = stage + (m * 16 + group_row) * kFp4GemmXRow + 32 * quad + 4 * step;
              const uint2 top = *reinterpret_cast<const uint2*>(row0);
              const uint2 bottom = *reinterpret_cast<const uint2*>(row0 + 8 * kFp4GemmXRow);
              a[m][0] = top.x;
              a[m][1] = bottom.x;
              a[m][2] = top.y;
              a[m][3] = bottom.y;
            }
          }
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint32_t byte0 = (words[j] >> (16 * half_word)) & 0xFFu;
            const uint32_t byte1 = (words[j] >> (16 * half_word + 8)) & 0xFFu;
            const uint32_t b0 = detail::multiply_bf16_pairs(lut[byte0 * 32 + lane], scale_of_word[j]);
            const uint32_t b1 = detail::multiply_bf16_pairs(lut[byte1 * 32 + lane], scale_of_word[j]);
#pragma unroll
            for (int m = 0; m < M_TILES; ++m) {
              if (m < m_tiles) ptx::mma_m16n8k16<__nv_bfloat16>(accumulator[m][j], a[m], b0, b1);
            }
          }
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) current[j] = next[j];
    }
    ptx::cp_async_wait<0>();

    // Store: rows pass_begin + 16m + group_row (+8), columns n_base + 8j - group_row + 2 * quad (+1).
#pragma unroll
    for (int m = 0; m < M_TILES; ++m) {
      if (m >= m_tiles) continue;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = pass_begin + m * 16 + group_row + 8 * half;
        if (row >= row_end) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int column = n_tile * kFp4GemmTileN + warp * 32 + 8 * j + 2 * quad;
          const float v0 = accumulator[m][j][2 * half] * global_scale;
          const float v1 = accumulator[m][j][2 * half + 1] * global_scale;
          if (params.k_splits == 1) {
            __nv_bfloat16* target = params.y + int64_t{row} * params.n + column;
            if (column + 1 < params.n && params.n % 2 == 0) {
              *reinterpret_cast<__nv_bfloat162*>(target) = __floats2bfloat162_rn(v0, v1);
            } else {
              if (column < params.n) target[0] = __float2bfloat16_rn(v0);
              if (column + 1 < params.n) target[1] = __float2bfloat16_rn(v1);
            }
          } else {
            float* target = params.partial + (int64_t{split} * params.tokens + row) * params.n + column;
            if (column < params.n) target[0] = v0;
            if (column + 1 < params.n) target[1] = v1;
          }
        }
      }
    }
  }
}

// Sums the k-split partials of every row in a group (in split order: deterministic) and
// writes zeros past offs[-1]. (static: a non-template kernel defined in a header.)
static __global__ void __launch_bounds__(256) fp4_grouped_gemm_finalize_kernel(const Fp4GemmParams params) {
  const int64_t total = int64_t{params.tokens} * params.n;
  int last_row = params.offs[params.num_experts - 1];
  last_row = last_row < 0 ? 0 : (last_row > params.tokens ? params.tokens : last_row);
  for (int64_t index = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x) {
    float sum = 0.0f;
    if (index / params.n < last_row) {
      for (int s = 0; s < params.k_splits; ++s) sum += params.partial[int64_t{s} * total + index];
    }
    params.y[index] = __float2bfloat16_rn(sum);
  }
}

}  // namespace helix
