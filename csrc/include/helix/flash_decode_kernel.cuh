// flash_decode CUDA kernel (torch-free): split-KV decode attention over a paged KV cache.
//
// Grid: x = head tile + split * head_tiles, y = sequence, z = KV head. A CTA streams one
// split (a contiguous token range) of one sequence's cache for one KV head and computes
// every query head of the GQA group that falls in its head tile (16 * WARPS_M heads), so
// each KV byte is read from HBM once per head tile (once in all for groups up to that size).
//
// Tensor cores (mma.sync m16n8k16, fp32 accumulate) do S = Q K^T and O += P V with the
// query heads as the M dimension (padded to 16). Warps split the work three ways:
//   warp_m: which 16 heads,  warp_v: which slice of Dv,  warp_t: which tokens of each tile.
// The warp_v warps of one (warp_m, warp_t) split the DK reduction of their shared scores and
// add the partial scores through shared memory, so each score is computed once (MLA: a 576-
// deep reduction that two warps used to repeat in full).
// K/V tiles of TILE tokens arrive through a STAGES-deep cp.async pipeline (16-byte copies,
// rows padded by 16 bytes so ldmatrix is bank-conflict free). fp8 tiles are copied as fp8
// and widened to q's dtype in shared memory (exact), then read like a 16-bit tile.
// The online softmax (helix/softmax_merge.h, log2 domain) keeps each row's max and sum in
// registers; at the end the warps of different token slices are merged through shared
// memory and the CTA writes either the final output (one split) or an fp32 partial state
// that a merge_states pass combines across splits.
#pragma once

#include <cuda_fp8.h>
#include <stdint.h>

#include "helix/mma.cuh"
#include "helix/softmax_merge.h"
#include "helix/vec.cuh"

namespace helix {

struct FlashDecodeParams {
  const void* q;  // [B, Q, Hq, Dk] (a 3-D q: Q = 1), q dtype
  int64_t q_stride_batch, q_stride_query, q_stride_head;
  // Several query tokens per sequence: a KV head's rows are its Q x group (query, head) pairs,
  // row j = query j / group_size, head j % group_size of the group; query i sees the first
  // query_key_lens[b, i] keys (nullptr: max(0, seq_len - Q + 1 + i)).
  int num_queries;
  const int32_t* query_key_lens;  // [B, Q] or nullptr
  int64_t query_key_lens_stride_batch, query_key_lens_stride_query;
  const void* k_cache;  // [num_blocks, block_size, Hkv, Dk], q dtype or fp8
  int64_t k_stride_block, k_stride_token, k_stride_head;
  const void* v_cache;  // [num_blocks, block_size, Hkv, Dv]; == k_cache for MLA
  int64_t v_stride_block, v_stride_token, v_stride_head;
  const int32_t* block_table;  // [B, max_blocks]
  int64_t block_table_stride_batch, block_table_stride_block;
  const int32_t* seq_lens;  // [B]
  int64_t seq_lens_stride;
  const float* k_scale;  // one element or nullptr (1.0)
  const float* v_scale;  // one element or nullptr (1.0); MLA passes k_scale here
  float softmax_scale;
  int num_q_heads, num_kv_heads, group_size, block_size, max_blocks_per_seq, num_blocks;
  int num_splits, head_tiles;  // head tiles per KV head: of its Q x group rows
  void* out;       // num_splits == 1: [B, Q, Hq, Dv] q dtype
  float* out_lse;  // num_splits == 1: [B, Q, Hq]
  float* partial_out;  // num_splits > 1: [num_splits, B, Q, Hq, Dv] fp32
  float* partial_lse;  // num_splits > 1: [num_splits, B, Q, Hq]
  int batch;
};

// Compile-time shape of one kernel configuration.
template <int DK, int DV, int WARPS_M, int WARPS_V, int WARPS_T, int TILE, int STAGES, bool SHARED_KV>
struct FlashDecodeConfig {
  static constexpr int kHeadDimK = DK, kHeadDimV = DV;
  static constexpr int kWarpsM = WARPS_M, kWarpsV = WARPS_V, kWarpsT = WARPS_T;
  static constexpr int kWarps = WARPS_M * WARPS_V * WARPS_T, kThreads = 32 * kWarps;
  static constexpr int kTile = TILE, kStages = STAGES;
  static constexpr bool kSharedKV = SHARED_KV;  // MLA: V is the first DV dims of the K entry
  static constexpr int kHeadsPerCta = 16 * WARPS_M;
  static constexpr int kTokensPerWarp = TILE / WARPS_T;
  static constexpr int kDvPerWarp = DV / WARPS_V;
  // The WARPS_V warps of a head tile and token slice split the DK reduction of the scores
  // (each issues DK / 16 / WARPS_V k-steps) and add their partial scores through shared
  // memory, so no score is computed twice; each then multiplies P by its Dv slice.
  static constexpr int kScoreKSteps = DK / 16 / WARPS_V;
  // Partial scores exchanged per tile: per warp, S_TILES x 4 floats per lane.
  static constexpr size_t exchange_bytes() {
    return WARPS_V > 1 ? size_t(WARPS_M) * WARPS_V * WARPS_T * 32 * (kTokensPerWarp / 8) * 4 * sizeof(float) : 0;
  }
  static_assert(DK % 16 == 0 && kDvPerWarp % 16 == 0, "head dims must split into 16-wide mma tiles");
  static_assert(kTokensPerWarp % 16 == 0, "each warp needs whole 16-token k-steps for P*V");
  static_assert(!SHARED_KV || DV <= DK, "MLA's V is a prefix of the K entry");
  static_assert(STAGES >= 2, "the pipeline needs at least two stages");
  static_assert((DK / 16) % WARPS_V == 0, "the Dv warps split the score reduction into equal k-step ranges");

  // Shared-memory rows (in elements of the 16-bit compute type), padded by 16 bytes.
  static constexpr int kKRow = DK + 8, kVRow = DV + 8;
  static constexpr int kQElements = kHeadsPerCta * kKRow;
  static constexpr int kTileElements = TILE * kKRow + (SHARED_KV ? 0 : TILE * kVRow);
  // fp8 staging rows (bytes), also padded by 16 bytes.
  static constexpr int kKRow8 = DK + 16, kVRow8 = DV + 16;
  static constexpr int kTileBytes8 = TILE * kKRow8 + (SHARED_KV ? 0 : TILE * kVRow8);

  static constexpr size_t pipeline_bytes(bool fp8) {
    // 16-bit caches: STAGES tiles. fp8 caches: STAGES fp8 tiles + one widened tile.
    return fp8 ? size_t(STAGES) * kTileBytes8 + size_t(kTileElements) * 2 : size_t(STAGES) * kTileElements * 2;
  }
  // The epilogue reuses the pipeline space: per token-slice warp group, the row states and
  // the (scaled) fp32 output of every head of the tile.
  static constexpr size_t epilogue_bytes() {
    return size_t(WARPS_T) * kHeadsPerCta * (2 * sizeof(float) + size_t(DV) * sizeof(float));
  }
  // The score exchange sits after the pipeline, inside the space the epilogue reuses once
  // the tile loop is over.
  static constexpr size_t smem_bytes(bool fp8) {
    const size_t loop = pipeline_bytes(fp8) + exchange_bytes();
    const size_t body = loop > epilogue_bytes() ? loop : epilogue_bytes();
    return size_t(kQElements) * 2 + body;
  }
};

namespace detail {

// Widens 16 fp8 E4M3 values to the 16-bit compute type (exact: every E4M3 value fits).
template <typename T>
HELIX_DEVICE uint32_t widen_fp8_pair(uint16_t pair);

template <>
HELIX_DEVICE uint32_t widen_fp8_pair<__half>(uint16_t pair) {
  const __half2_raw halves = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
  return static_cast<uint32_t>(halves.x) | (static_cast<uint32_t>(halves.y) << 16);
}

template <>
HELIX_DEVICE uint32_t widen_fp8_pair<__nv_bfloat16>(uint16_t pair) {
  const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
  const float2 values = __half22float2(*reinterpret_cast<const __half2*>(&raw));
  return ptx::pack_pair<__nv_bfloat16>(values.x, values.y);  // exact: fp16 -> bf16 of E4M3 values
}

HELIX_DEVICE int clamp_length(int length, int capacity) {
  return length < 0 ? 0 : (length > capacity ? capacity : length);
}

// Keys query `query` of sequence `batch` sees, in [0, length] (length: the clamped seq_len;
// unchecked query_key_lens values are clamped too, so no key past the sequence is ever read).
HELIX_DEVICE int visible_keys(const FlashDecodeParams& params, int batch, int query, int length) {
  const int64_t seen = params.query_key_lens != nullptr
                           ? int64_t{params.query_key_lens[batch * params.query_key_lens_stride_batch +
                                                           query * params.query_key_lens_stride_query]}
                           : int64_t{length} - params.num_queries + 1 + query;
  return seen < 0 ? 0 : (seen > length ? length : static_cast<int>(seen));
}

}  // namespace detail

template <typename Config, typename T, bool KV_FP8>
__global__ void __launch_bounds__(Config::kThreads)
    flash_decode_kernel(const FlashDecodeParams params) {
  constexpr int DK = Config::kHeadDimK, DV = Config::kHeadDimV, TILE = Config::kTile;
  constexpr int STAGES = Config::kStages, THREADS = Config::kThreads;
  constexpr int HEADS = Config::kHeadsPerCta, TOKENS_PER_WARP = Config::kTokensPerWarp;
  constexpr int DV_PER_WARP = Config::kDvPerWarp, WARPS_M = Config::kWarpsM, WARPS_V = Config::kWarpsV;
  constexpr int WARPS_T = Config::kWarpsT;
  constexpr int KROW = Config::kKRow, VROW = Config::kVRow;
  constexpr int S_TILES = TOKENS_PER_WARP / 8;  // n8 tiles of scores per warp
  constexpr int O_TILES = DV_PER_WARP / 8;      // n8 tiles of output per warp
  constexpr int KV_ELEMENT_BYTES = KV_FP8 ? 1 : 2;
  constexpr int K_CHUNKS = DK * KV_ELEMENT_BYTES / 16, V_CHUNKS = DV * KV_ELEMENT_BYTES / 16;  // 16 B per row
  static_assert(DK * KV_ELEMENT_BYTES % 16 == 0 && DV * KV_ELEMENT_BYTES % 16 == 0, "rows of whole 16 B chunks");

  HELIX_DYNAMIC_SHARED(unsigned char, shared);
  T* q_tile = reinterpret_cast<T*>(shared);
  unsigned char* body = shared + size_t(Config::kQElements) * 2;
  // After the pipeline stages (and fp8's widened tile); the epilogue reuses it after the loop.
  float* score_exchange = reinterpret_cast<float*>(body + Config::pipeline_bytes(KV_FP8));

  const int head_tile = blockIdx.x % params.head_tiles;
  const int split = blockIdx.x / params.head_tiles;
  const int batch = blockIdx.y, kv_head = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = warp % WARPS_M, warp_v = (warp / WARPS_M) % WARPS_V, warp_t = warp / (WARPS_M * WARPS_V);

  // This split's token range: the sequence's actual length is split evenly in whole tiles.
  // Token positions fit in 32 bits (the launcher checks max_blocks * block_size < 2^31), so
  // the per-row block lookups divide in 32 bits; element offsets are 64-bit throughout.
  // (An empty cache holds no valid block, so nothing is read from it whatever seq_lens says.)
  const int capacity = params.num_blocks > 0 ? params.max_blocks_per_seq * params.block_size : 0;
  const int seq_len = detail::clamp_length(params.seq_lens[batch * params.seq_lens_stride], capacity);
  // The keys any query of the sequence sees (the last query's, when query_key_lens is valid).
  int length = 0;
  for (int query = 0; query < params.num_queries; ++query) {
    const int seen = detail::visible_keys(params, batch, query, seq_len);
    length = seen > length ? seen : length;
  }
  const int64_t tiles_total = (int64_t{length} + TILE - 1) / TILE;
  const int64_t tiles_per_split = (tiles_total + params.num_splits - 1) / params.num_splits;
  const int64_t begin64 = int64_t{split} * tiles_per_split * TILE;
  const int begin = begin64 < length ? static_cast<int>(begin64) : length;
  const int end = begin64 + tiles_per_split * TILE < length ? static_cast<int>(begin64 + tiles_per_split * TILE)
                                                             : length;
  // This head tile's rows of the KV head's Q x group (query, head) rows.
  const int rows_per_kv_head = params.num_queries * params.group_size;
  const int first_row = head_tile * HEADS;
  const int heads_here = rows_per_kv_head - first_row < HEADS ? rows_per_kv_head - first_row : HEADS;
  // Row r of the tile: its query token, and its row of out viewed as [B * Q * Hq, Dv].
  auto query_of = [&](int row) { return (first_row + row) / params.group_size; };
  auto out_row = [&](int row) {
    const int query = query_of(row), head = (first_row + row) % params.group_size;
    return (int64_t{batch} * params.num_queries + query) * params.num_q_heads +
           int64_t{kv_head} * params.group_size + head;
  };
  const int64_t rows_total = int64_t{params.batch} * params.num_queries * params.num_q_heads;
  const bool single_split = params.num_splits == 1;

  if (begin >= end) {
    // An empty split (or an empty sequence): lse = -inf; the final output also needs zeros.
    for (int index = threadIdx.x; index < heads_here; index += THREADS) {
      if (single_split) {
        params.out_lse[out_row(index)] = neg_inf();
      } else {
        params.partial_lse[int64_t{split} * rows_total + out_row(index)] = neg_inf();
      }
    }
    if (single_split) {
      for (int index = threadIdx.x; index < heads_here * DV; index += THREADS) {
        static_cast<T*>(params.out)[out_row(index / DV) * DV + index % DV] = ElementTraits<T>::from_float(0.0f);
      }
    }
    return;  // uniform across the CTA: no barrier is skipped by some threads only
  }

  // Query rows of this head tile (zeros past the group's end), joined to the first tile's group.
  {
    const T* q = static_cast<const T*>(params.q) + int64_t{batch} * params.q_stride_batch;
    constexpr int Q_CHUNKS = DK / 8;
    for (int chunk = threadIdx.x; chunk < HEADS * Q_CHUNKS; chunk += THREADS) {
      const int row = chunk / Q_CHUNKS, column = chunk % Q_CHUNKS;
      const bool valid = row < heads_here;
      const int64_t head = int64_t{kv_head} * params.group_size + (first_row + row) % params.group_size;
      const T* source =
          q + (valid ? query_of(row) * params.q_stride_query + head * params.q_stride_head + column * 8 : 0);
      ptx::cp_async_16(ptx::shared_address(q_tile + row * KROW + column * 8), source, valid);
    }
  }

  const int tiles = (end - begin + TILE - 1) / TILE;
  const int32_t* table = params.block_table + int64_t{batch} * params.block_table_stride_batch;
  const unsigned char* k_cache = static_cast<const unsigned char*>(params.k_cache);
  const unsigned char* v_cache = static_cast<const unsigned char*>(params.v_cache);

  // Stage layout: [K rows][V rows] of TILE tokens each (V rows absent for MLA).
  constexpr int STAGE_BYTES = KV_FP8 ? Config::kTileBytes8 : Config::kTileElements * 2;
  constexpr int K_ROW_BYTES = KV_FP8 ? Config::kKRow8 : KROW * 2;
  constexpr int V_ROW_BYTES = KV_FP8 ? Config::kVRow8 : VROW * 2;

  auto load_rows = [&](unsigned char* destination, int row_bytes, const unsigned char* cache, int64_t stride_block,
                       int64_t stride_token, int64_t stride_head, int chunks, int first_token) {
    for (int chunk = threadIdx.x; chunk < TILE * chunks; chunk += THREADS) {
      const int row = chunk / chunks, column = chunk % chunks;
      const int token = first_token + row;
      const bool valid = token < end;
      const unsigned char* source = cache;
      if (valid) {
        int64_t block = table[(token / params.block_size) * params.block_table_stride_block];
        // Never follow an out-of-range id (values are only checked with HELIX_CHECK_INPUTS=1).
        block = block < 0 || block >= params.num_blocks ? 0 : block;
        source = cache + ((block * stride_block + (token % params.block_size) * stride_token +
                           int64_t{kv_head} * stride_head) * KV_ELEMENT_BYTES) + column * 16;
      }
      ptx::cp_async_16(ptx::shared_address(destination + row * row_bytes + column * 16), source, valid);
    }
  };
  auto load_tile = [&](int tile_index) {
    if (tile_index < tiles) {
      unsigned char* stage = body + (tile_index % STAGES) * STAGE_BYTES;
      const int first_token = begin + tile_index * TILE;
      load_rows(stage, K_ROW_BYTES, k_cache, params.k_stride_block, params.k_stride_token, params.k_stride_head,
                K_CHUNKS, first_token);
      if constexpr (!Config::kSharedKV) {
        load_rows(stage + TILE * K_ROW_BYTES, V_ROW_BYTES, v_cache, params.v_stride_block, params.v_stride_token,
                  params.v_stride_head, V_CHUNKS, first_token);
      }
    }
    ptx::cp_async_commit();  // one group per tile slot, empty past the end, so waits count evenly
  };

  // Widens one fp8 stage into the 16-bit tile that the mma loads read.
  T* widened = reinterpret_cast<T*>(body + size_t(STAGES) * STAGE_BYTES);
  auto widen_rows = [&](const unsigned char* source, int source_row_bytes, T* destination, int destination_row,
                        int dims) {
    const int chunks = dims / 16;  // 16 fp8 values per chunk
    for (int chunk = threadIdx.x; chunk < TILE * chunks; chunk += THREADS) {
      const int row = chunk / chunks, column = chunk % chunks;
      const uint4 packed = *reinterpret_cast<const uint4*>(source + row * source_row_bytes + column * 16);
      const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
      uint32_t pairs[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        pairs[2 * i] = detail::widen_fp8_pair<T>(static_cast<uint16_t>(words[i] & 0xFFFFu));
        pairs[2 * i + 1] = detail::widen_fp8_pair<T>(static_cast<uint16_t>(words[i] >> 16));
      }
      uint4* target = reinterpret_cast<uint4*>(destination + row * destination_row + column * 16);
      target[0] = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
      target[1] = make_uint4(pairs[4], pairs[5], pairs[6], pairs[7]);
    }
  };

  const float score_scale = params.softmax_scale * (params.k_scale != nullptr ? *params.k_scale : 1.0f) * kLog2e;
  const float value_scale = params.v_scale != nullptr ? *params.v_scale : 1.0f;

  // Per thread: rows lane/4 and lane/4 + 8 of the warp's 16 heads; the sums are this
  // thread's share (its columns), reduced across the quad at the end. Each row masks the keys
  // past those its query sees (rows past the tile's end: the split's end).
  SoftmaxState state[2] = {softmax_state_empty(), softmax_state_empty()};
  int row_end[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp_m * 16 + lane / 4 + 8 * r;
    const int seen = row < heads_here ? detail::visible_keys(params, batch, query_of(row), seq_len) : end;
    row_end[r] = seen < end ? seen : end;
  }
  float output[O_TILES][4];
#pragma unroll
  for (int n = 0; n < O_TILES; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) output[n][i] = 0.0f;
  }

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) load_tile(s);

  const uint32_t q_address = ptx::shared_address(q_tile + (warp_m * 16 + lane % 16) * KROW + (lane / 16) * 8);
  const int token_base = warp_t * TOKENS_PER_WARP;  // first token of this warp within a tile

  for (int tile = 0; tile < tiles; ++tile) {
    if (HELIX_PLANT(kPlantWaitGroupOffByOne)) {
      ptx::cp_async_wait<STAGES - 1>();
    } else {
      ptx::cp_async_wait<STAGES - 2>();
    }
    // The tile has landed for every thread; the slot reloaded below is free.
    if (!HELIX_PLANT(kPlantMissingBarrier)) __syncthreads();
    load_tile(tile + STAGES - 1);

    const T* k_tile;
    const T* v_tile;
    int v_row;
    if constexpr (KV_FP8) {
      const unsigned char* stage = body + (tile % STAGES) * STAGE_BYTES;
      widen_rows(stage, Config::kKRow8, widened, KROW, DK);
      if constexpr (!Config::kSharedKV) widen_rows(stage + TILE * Config::kKRow8, Config::kVRow8, widened + TILE * KROW, VROW, DV);
      __syncthreads();
      k_tile = widened;
    } else {
      k_tile = reinterpret_cast<const T*>(body + (tile % STAGES) * STAGE_BYTES);
    }
    if constexpr (Config::kSharedKV) {
      v_tile = k_tile;
      v_row = KROW;
    } else {
      v_tile = k_tile + TILE * KROW;
      v_row = VROW;
    }

    // S = Q K^T for the warp's 16 heads and TOKENS_PER_WARP tokens.
    float scores[S_TILES][4];
#pragma unroll
    for (int n = 0; n < S_TILES; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) scores[n][i] = 0.0f;
    }
    const uint32_t k_address = ptx::shared_address(
        k_tile + (token_base + lane % 8 + (lane / 16) * 8) * KROW + ((lane / 8) % 2) * 8);
    // This warp's share of the DK reduction (all of it when WARPS_V == 1).
    const int first_k = warp_v * Config::kScoreKSteps;
#pragma unroll
    for (int step = 0; step < Config::kScoreKSteps; ++step) {
      const int k = first_k + step;
      uint32_t a[4];
      ptx::ldmatrix_x4(a, q_address + k * 32);
#pragma unroll
      for (int n = 0; n < S_TILES / 2; ++n) {
        uint32_t b[4];
        ptx::ldmatrix_x4(b, k_address + (n * 16 * KROW + k * 16) * 2);
        ptx::mma_m16n8k16<T>(scores[2 * n], a, b[0], b[1]);
        ptx::mma_m16n8k16<T>(scores[2 * n + 1], a, b[2], b[3]);
      }
    }
    if constexpr (WARPS_V > 1) {
      // The Dv warps of this head tile and token slice hold partial scores in the same
      // fragment layout: publish, then every one adds all partials in warp_v order (the same
      // bits in each). The barrier at the top of the next tile keeps the buffer until all
      // have read it.
      const int group = warp_m + WARPS_M * warp_t;  // the warps of one group differ in warp_v only
      auto slot = [&](int v, int n, int i) {
        return ((group * WARPS_V + v) * (S_TILES * 4) + n * 4 + i) * 32 + lane;  // lane-minor: no bank conflicts
      };
#pragma unroll
      for (int n = 0; n < S_TILES; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) score_exchange[slot(warp_v, n, i)] = scores[n][i];
      }
      if (!HELIX_PLANT(kPlantMissingExchangeBarrier)) __syncthreads();
#pragma unroll
      for (int n = 0; n < S_TILES; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float total = score_exchange[slot(0, n, i)];
#pragma unroll
          for (int v = 1; v < WARPS_V; ++v) total += score_exchange[slot(v, n, i)];
          scores[n][i] = total;
        }
      }
    }

    // Scale into the log2 domain, mask tokens past the split, fold into the running state.
    const int tile_first = begin + tile * TILE + token_base;
    float tile_max[2] = {neg_inf(), neg_inf()};
#pragma unroll
    for (int n = 0; n < S_TILES; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int token = tile_first + n * 8 + (lane % 4) * 2 + (i % 2);
        const int bound = row_end[i / 2];
        const bool inside = HELIX_PLANT(kPlantTileBoundOffByOne) ? token <= bound : token < bound;
        scores[n][i] = inside ? scores[n][i] * score_scale : neg_inf();
        tile_max[i / 2] = fmaxf(tile_max[i / 2], scores[n][i]);
      }
    }
    float offset[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float alpha = online_softmax_rescale(state[r], tile_max[r]);
#pragma unroll
      for (int n = 0; n < O_TILES; ++n) {
        output[n][2 * r] *= alpha;
        output[n][2 * r + 1] *= alpha;
      }
      offset[r] = online_softmax_offset(state[r]);
    }

    // P = exp2(S - max) in fp32 for the sums, rounded to T as the A operand of P V.
    const uint32_t v_address = ptx::shared_address(
        v_tile + (token_base + lane % 8 + ((lane / 8) % 2) * 8) * v_row + warp_v * DV_PER_WARP + (lane / 16) * 8);
#pragma unroll
    for (int j = 0; j < S_TILES / 2; ++j) {
      float p[2][4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          p[h][i] = exp2f(scores[2 * j + h][i] - offset[i / 2]);
          state[i / 2].sum += p[h][i];
        }
      }
      uint32_t a[4] = {ptx::pack_pair<T>(p[0][0], p[0][1]), ptx::pack_pair<T>(p[0][2], p[0][3]),
                       ptx::pack_pair<T>(p[1][0], p[1][1]), ptx::pack_pair<T>(p[1][2], p[1][3])};
      if (HELIX_PLANT(kPlantSwappedFragment)) {
        const uint32_t swapped = a[1];
        a[1] = a[2];
        a[2] = swapped;
      }
#pragma unroll
      for (int n = 0; n < O_TILES / 2; ++n) {
        uint32_t b[4];
        ptx::ldmatrix_x4_transposed(b, v_address + (j * 16 * v_row + n * 16) * 2);
        ptx::mma_m16n8k16<T>(output[2 * n], a, b[0], b[1]);
        ptx::mma_m16n8k16<T>(output[2 * n + 1], a, b[2], b[3]);
      }
    }
  }

  // Epilogue. Row sums are complete once the quad's shares are added.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    state[r].sum += __shfl_xor_sync(0xffffffffu, state[r].sum, 1);
    state[r].sum += __shfl_xor_sync(0xffffffffu, state[r].sum, 2);
  }
  ptx::cp_async_wait<0>();  // the trailing (empty) groups too, before the space is reused
  __syncthreads();

  // Per token slice t: row states [WARPS_T][HEADS][2] then outputs [WARPS_T][HEADS][DV].
  float* slice_state = reinterpret_cast<float*>(body);
  float* slice_output = slice_state + WARPS_T * HEADS * 2;
  const int row0 = warp_m * 16 + lane / 4;
  if (warp_v == 0 && lane % 4 == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      slice_state[(warp_t * HEADS + row0 + 8 * r) * 2] = state[r].max;
      slice_state[(warp_t * HEADS + row0 + 8 * r) * 2 + 1] = state[r].sum;
    }
  }
  __syncthreads();

  // Merge the slices' states per row, then write this warp's output scaled by its share.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + 8 * r;
    SoftmaxState total = softmax_state_empty();
    for (int t = 0; t < WARPS_T; ++t) {
      online_softmax_combine(total, {slice_state[(t * HEADS + row) * 2], slice_state[(t * HEADS + row) * 2 + 1]});
    }
    // This slice's share of the row: exp2(max - total max) (0 for an empty slice) / total sum;
    // 0 for an empty row, NaN for a poisoned one (a NaN or +inf score in any slice).
    const float share = online_softmax_normalizer(total, value_scale) *
                        (total.sum == 0.0f ? 0.0f : exp2f(state[r].max - total.max));
#pragma unroll
    for (int n = 0; n < O_TILES; ++n) {
      const int column = warp_v * DV_PER_WARP + n * 8 + (lane % 4) * 2;
      float2* target = reinterpret_cast<float2*>(slice_output + (warp_t * HEADS + row) * DV + column);
      *target = make_float2(output[n][2 * r] * share, output[n][2 * r + 1] * share);
    }
    if (warp_v == 0 && warp_t == 0 && lane % 4 == 0 && row < heads_here) {
      const float lse = online_softmax_lse(total);
      if (single_split) {
        params.out_lse[out_row(row)] = lse;
      } else {
        params.partial_lse[int64_t{split} * rows_total + out_row(row)] = lse;
      }
    }
  }
  __syncthreads();

  // Sum the slices and store 4 elements per thread per step (8 B of T, or 16 B of fp32).
  constexpr int QUADS = DV / 4;
  for (int index = threadIdx.x; index < heads_here * QUADS; index += THREADS) {
    const int row = index / QUADS, column = (index % QUADS) * 4;
    float4 sum = *reinterpret_cast<const float4*>(slice_output + row * DV + column);
    for (int t = 1; t < WARPS_T; ++t) {
      const float4 part = *reinterpret_cast<const float4*>(slice_output + (t * HEADS + row) * DV + column);
      sum.x += part.x;
      sum.y += part.y;
      sum.z += part.z;
      sum.w += part.w;
    }
    if (single_split) {
      ElementVector<T, 4> result;
      result.elements[0] = ElementTraits<T>::from_float(sum.x);
      result.elements[1] = ElementTraits<T>::from_float(sum.y);
      result.elements[2] = ElementTraits<T>::from_float(sum.z);
      result.elements[3] = ElementTraits<T>::from_float(sum.w);
      store_vector<T, 4>(static_cast<T*>(params.out) + out_row(row) * DV + column, result);
    } else {
      const int64_t partial_row = int64_t{split} * rows_total + out_row(row);
      *reinterpret_cast<float4*>(params.partial_out + partial_row * DV + column) = sum;
    }
  }
}

}  // namespace helix
