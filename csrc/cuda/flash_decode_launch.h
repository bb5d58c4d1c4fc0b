// flash_decode launcher body, device-agnostic: the CUDA kernel's limits, the configuration for
// the head dims, the KV split plan, the split kernel and, for more than one split, the
// merge_states kernel over the fp32 partial states (a workspace from the tensor allocator: no
// host sync, no other allocation, so the op can be captured in a CUDA graph). Shared by the
// CUDA op (flash_decode.cu) and the SIMT host runtime's (csrc/simt/ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

#include "cuda/launch_context.h"
#include "flash_decode_args.h"
#include "flash_decode_variants.h"
#include "merge_states_launch.h"

namespace helix {
namespace flash_decode_launch {

enum class HeadDims { kD64, kD128, kD256, kMla };

// More splits than this only add empty CTAs and workspace (the heuristic stays at <= 256).
constexpr int64_t kMaxSplits = 4096;

inline HeadDims select_head_dims(const FlashDecodeShape& shape) {
  const auto dims = std::make_pair(shape.head_dim_k, shape.head_dim_v);
  if (shape.mla && dims == std::make_pair<int64_t, int64_t>(576, 512)) return HeadDims::kMla;
  if (!shape.mla && shape.head_dim_k == shape.head_dim_v) {
    if (shape.head_dim_k == 64) return HeadDims::kD64;
    if (shape.head_dim_k == 128) return HeadDims::kD128;
    if (shape.head_dim_k == 256) return HeadDims::kD256;
  }
  TORCH_CHECK(false, "flash_decode: the CUDA kernel supports (Dk, Dv) = (64, 64), (128, 128), (256, 256) with a "
              "v_cache and (576, 512) with v_cache=None (MLA); got (", shape.head_dim_k, ", ", shape.head_dim_v,
              ") with ", shape.mla ? "v_cache=None" : "a v_cache", " (the CPU kernel takes any head dims)");
}

inline FlashDecodeVariant variant_for(HeadDims dims, bool bf16, bool fp8) {
  switch (dims) {
    case HeadDims::kD64: return flash_decode_variant_d64(bf16, fp8);
    case HeadDims::kD128: return flash_decode_variant_d128(bf16, fp8);
    case HeadDims::kD256: return flash_decode_variant_d256(bf16, fp8);
    case HeadDims::kMla: return flash_decode_variant_mla(bf16, fp8);
  }
  TORCH_CHECK(false, "flash_decode: unknown head-dim family");
}

// Kernel facts per (configuration, device): the smem attribute is set and the occupancy
// queried once, not on every call.
inline const FlashDecodeKernelInfo& kernel_info(HeadDims dims, bool bf16, bool fp8, int device,
                                         const FlashDecodeVariant& variant) {
  static std::mutex mutex;
  static std::map<std::tuple<int, bool, bool, int>, FlashDecodeKernelInfo> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(static_cast<int>(dims), bf16, fp8, device);
  auto found = cache.find(key);
  if (found == cache.end()) {
    FlashDecodeKernelInfo info{};
    HELIX_CUDA_CHECK(variant.prepare(device, &info));
    TORCH_CHECK(info.ctas_per_sm >= 1, "flash_decode: the CUDA kernel for these head dims needs ", info.smem_bytes,
                " bytes of shared memory per block, more than this GPU offers (it is built for Hopper and "
                "Blackwell, 227 KB)");
    found = cache.emplace(key, info).first;
  }
  return found->second;
}

inline void check_aligned_rows(const at::Tensor& tensor, const char* name, std::initializer_list<int> dims) {
  const int64_t element = tensor.element_size();
  bool aligned = is_aligned(tensor.data_ptr(), 16);
  for (int dim : dims) aligned = aligned && (tensor.stride(dim) * element) % 16 == 0;
  TORCH_CHECK(aligned, "flash_decode: the CUDA kernel reads ", name, " in 16-byte rows: its data pointer and its "
              "strides ", tensor.strides(), " (except the last) must be multiples of 16 bytes");
}

// Splits per sequence: enough CTAs to fill the GPU once (B * Hkv * head_tiles CTAs per
// split), never more splits than tiles the cache can hold. On the device the actual length
// of each sequence is divided evenly (in whole tiles) over these splits.
inline int plan_splits(int64_t requested, int64_t ctas_per_split, int64_t capacity, const FlashDecodeKernelInfo& info,
                int multiprocessor_count) {
  if (requested > 0) return static_cast<int>(requested);
  const int64_t wave = int64_t{multiprocessor_count} * info.ctas_per_sm;
  const int64_t max_splits = std::max<int64_t>(1, std::min<int64_t>(256, (capacity + info.tile_tokens - 1) /
                                                                               info.tile_tokens));
  return static_cast<int>(std::clamp<int64_t>((wave + ctas_per_split - 1) / ctas_per_split, 1, max_splits));
}

// The CUDA kernel's launch after the device-independent checks (check_flash_decode_args):
// its own limits, the configuration, the split plan, the split kernel and the merge.
inline std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& q, const at::Tensor& k_cache,
                                       const std::optional<at::Tensor>& v_cache, const at::Tensor& block_table,
                                       const at::Tensor& seq_lens, double softmax_scale,
                                       const std::optional<at::Tensor>& k_scale,
                                       const std::optional<at::Tensor>& v_scale, int64_t num_splits,
                                       const std::optional<at::Tensor>& query_key_lens, const FlashDecodeShape& shape,
                                       const LaunchContext& context) {
  TORCH_CHECK(q.scalar_type() != at::kFloat, "flash_decode: the CUDA kernel takes bfloat16 or float16 q and caches "
              "(tensor cores); float32 runs on the CPU only");
  const HeadDims dims = select_head_dims(shape);
  const int64_t capacity = block_table_capacity(shape);
  // Token positions are 32-bit in the kernel; keep a tile of headroom below 2^31.
  TORCH_CHECK(capacity <= INT32_MAX - 1024, "flash_decode: block_table holds ", shape.max_blocks_per_seq,
              " blocks of ", shape.block_size, " tokens per sequence; the CUDA kernel takes at most 2^31 - 1025");
  TORCH_CHECK(num_splits <= kMaxSplits, "flash_decode: num_splits must be at most ", kMaxSplits, ", got ",
              num_splits);
  TORCH_CHECK(shape.batch <= 65535 && shape.num_kv_heads <= 65535,
              "flash_decode: the CUDA kernel takes at most 65535 sequences and 65535 KV heads, got B = ", shape.batch,
              " and Hkv = ", shape.num_kv_heads);
  TORCH_CHECK(shape.num_blocks <= INT32_MAX, "flash_decode: k_cache has more than 2^31 - 1 blocks");
  if (shape.q_4d) {
    check_aligned_rows(q, "q", {0, 1, 2});
  } else {
    check_aligned_rows(q, "q", {0, 1});
  }
  TORCH_CHECK(shape.num_queries * (shape.num_q_heads / shape.num_kv_heads) <= INT32_MAX - 1024,
              "flash_decode: the CUDA kernel takes Q x (Hq / Hkv) < 2^31 - 1024 rows per KV head, got Q = ",
              shape.num_queries, " and a group of ", shape.num_q_heads / shape.num_kv_heads);
  check_aligned_rows(k_cache, "k_cache", {0, 1, 2});
  if (v_cache.has_value()) check_aligned_rows(*v_cache, "v_cache", {0, 1, 2});

  auto [out, lse] = allocate_flash_decode_outputs(q, shape);
  if (lse.numel() == 0) return {out, lse};

  const bool bf16 = q.scalar_type() == at::kBFloat16;
  const int device = context.device;
  const FlashDecodeVariant variant = variant_for(dims, bf16, shape.kv_fp8);
  const FlashDecodeKernelInfo& info = kernel_info(dims, bf16, shape.kv_fp8, device, variant);

  FlashDecodeParams params{};
  params.q = q.const_data_ptr();
  params.q_stride_batch = q.stride(0);
  params.q_stride_query = shape.q_4d ? q.stride(1) : 0;
  params.q_stride_head = q.stride(-2);
  params.num_queries = static_cast<int>(shape.num_queries);
  if (query_key_lens.has_value()) {
    params.query_key_lens = query_key_lens->const_data_ptr<int32_t>();
    params.query_key_lens_stride_batch = query_key_lens->stride(0);
    params.query_key_lens_stride_query = query_key_lens->stride(1);
  }
  params.k_cache = k_cache.const_data_ptr();
  params.k_stride_block = k_cache.stride(0);
  params.k_stride_token = k_cache.stride(1);
  params.k_stride_head = k_cache.stride(2);
  const at::Tensor& values = v_cache.has_value() ? *v_cache : k_cache;
  params.v_cache = values.const_data_ptr();
  params.v_stride_block = values.stride(0);
  params.v_stride_token = values.stride(1);
  params.v_stride_head = values.stride(2);
  params.block_table = block_table.const_data_ptr<int32_t>();
  params.block_table_stride_batch = block_table.stride(0);
  params.block_table_stride_block = block_table.stride(1);
  params.seq_lens = seq_lens.const_data_ptr<int32_t>();
  params.seq_lens_stride = seq_lens.stride(0);
  params.k_scale = k_scale.has_value() ? k_scale->const_data_ptr<float>() : nullptr;
  // MLA: V is part of the K entry and is dequantized with k_scale.
  params.v_scale = shape.mla ? params.k_scale : (v_scale.has_value() ? v_scale->const_data_ptr<float>() : nullptr);
  params.softmax_scale = static_cast<float>(softmax_scale);
  params.batch = static_cast<int>(shape.batch);
  params.num_q_heads = static_cast<int>(shape.num_q_heads);
  params.num_kv_heads = static_cast<int>(shape.num_kv_heads);
  params.group_size = static_cast<int>(shape.num_q_heads / shape.num_kv_heads);
  params.block_size = static_cast<int>(shape.block_size);
  params.max_blocks_per_seq = static_cast<int>(shape.max_blocks_per_seq);
  params.num_blocks = static_cast<int>(shape.num_blocks);
  params.head_tiles = (params.num_queries * params.group_size + info.heads_per_cta - 1) / info.heads_per_cta;
  params.num_splits = plan_splits(num_splits, shape.batch * shape.num_kv_heads * params.head_tiles, capacity, info,
                                  context.multiprocessor_count);
  TORCH_CHECK(int64_t{params.head_tiles} * params.num_splits <= INT32_MAX, "flash_decode: too many splits");

  const cudaStream_t stream = context.stream;
  if (params.num_splits == 1) {
    params.out = out.mutable_data_ptr();
    params.out_lse = lse.mutable_data_ptr<float>();
    HELIX_CUDA_CHECK(variant.launch(params, info, stream));
    return {out, lse};
  }
  // Query tokens fold into the batch dim of the partial states and of the merge.
  const int64_t rows = shape.batch * shape.num_queries;
  const at::Tensor partial_out =
      at::empty({params.num_splits, rows, shape.num_q_heads, shape.head_dim_v}, q.options().dtype(at::kFloat));
  const at::Tensor partial_lse = at::empty({params.num_splits, rows, shape.num_q_heads}, q.options().dtype(at::kFloat));
  params.partial_out = partial_out.mutable_data_ptr<float>();
  params.partial_lse = partial_lse.mutable_data_ptr<float>();
  HELIX_CUDA_CHECK(variant.launch(params, info, stream));

  at::Tensor merged_out = out.view({rows, shape.num_q_heads, shape.head_dim_v});
  at::Tensor merged_lse = lse.view({rows, shape.num_q_heads});
  launch_split_merge(partial_out, partial_lse, merged_out, merged_lse, context);
  return {out, lse};
}

}  // namespace flash_decode_launch
}  // namespace helix
