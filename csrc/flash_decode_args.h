// Argument checks for flash_decode, shared by its CPU and CUDA launchers so both reject
// the same inputs with the same messages, plus the value checks of block_table/seq_lens
// (always on CPU; on CUDA only with HELIX_CHECK_INPUTS=1, as they cost a device sync).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdlib>
#include <optional>
#include <tuple>
#include <vector>

namespace helix {

struct FlashDecodeShape {
  int64_t batch, num_q_heads, head_dim_k, head_dim_v;
  int64_t num_queries;  // query tokens per sequence: q [B, Q, Hq, Dk] (1 for a 3-D q)
  bool q_4d;            // q (and so out and lse) have the Q dim
  int64_t num_blocks, block_size, num_kv_heads, max_blocks_per_seq;
  bool kv_fp8;
  bool mla;  // v_cache is None: V is the first head_dim_v dims of k_cache
};

// A size-1 dim's stride never matters: such a last dim is contiguous whatever its stride.
inline bool last_dim_contiguous(const at::Tensor& tensor) {
  return tensor.size(-1) <= 1 || tensor.stride(-1) == 1;
}

// Tokens one block_table row addresses (max_blocks * block_size), saturated at INT64_MAX: an
// expanded block_table may claim 2^62 columns, and the product must not overflow.
inline int64_t block_table_capacity(const FlashDecodeShape& shape) {
  int64_t capacity = 0;
  if (__builtin_mul_overflow(shape.max_blocks_per_seq, shape.block_size, &capacity)) return INT64_MAX;
  return capacity;
}

inline void check_scale(const std::optional<at::Tensor>& scale, const char* name, const at::Tensor& q) {
  if (!scale.has_value()) return;
  TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->numel() == 1,
              "flash_decode: ", name, " must be a float32 tensor with one element (a per-tensor scale), got ",
              scale->scalar_type(), " with shape ", scale->sizes());
  TORCH_CHECK(scale->device() == q.device(), "flash_decode: ", name, " must be on ", q.device(), ", got ",
              scale->device());
}

inline FlashDecodeShape check_flash_decode_args(const at::Tensor& q, const at::Tensor& k_cache,
                                                const std::optional<at::Tensor>& v_cache,
                                                const at::Tensor& block_table, const at::Tensor& seq_lens,
                                                double softmax_scale, int64_t head_dim_v,
                                                const std::optional<at::Tensor>& k_scale,
                                                const std::optional<at::Tensor>& v_scale, int64_t num_splits,
                                                const std::optional<at::Tensor>& query_key_lens) {
  TORCH_CHECK(q.dim() == 3 || q.dim() == 4,
              "flash_decode: q must be 3-D [B, Hq, Dk] or 4-D [B, Q, Hq, Dk] (Q query tokens per sequence), got shape ",
              q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf || q.scalar_type() == at::kFloat,
              "flash_decode: q must be bfloat16, float16 or float32 (float32: CPU only), got ", q.scalar_type());
  TORCH_CHECK(k_cache.dim() == 4, "flash_decode: k_cache must be 4-D [num_blocks, block_size, Hkv, Dk], got shape ",
              k_cache.sizes());
  const bool kv_fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(kv_fp8 || k_cache.scalar_type() == q.scalar_type(),
              "flash_decode: k_cache must have q's dtype (", q.scalar_type(), ") or float8_e4m3fn, got ",
              k_cache.scalar_type());
  FlashDecodeShape shape;
  shape.batch = q.size(0);
  shape.q_4d = q.dim() == 4;
  shape.num_queries = shape.q_4d ? q.size(1) : 1;
  shape.num_q_heads = q.size(-2);
  shape.head_dim_k = q.size(-1);
  shape.num_blocks = k_cache.size(0);
  shape.block_size = k_cache.size(1);
  shape.num_kv_heads = k_cache.size(2);
  shape.kv_fp8 = kv_fp8;
  shape.mla = !v_cache.has_value();
  TORCH_CHECK(k_cache.size(3) == shape.head_dim_k, "flash_decode: k_cache's head dim (", k_cache.size(3),
              ") must equal q's (", shape.head_dim_k, ")");
  TORCH_CHECK(shape.head_dim_k >= 1, "flash_decode: q must have a head dim Dk >= 1");
  TORCH_CHECK(shape.block_size >= 1, "flash_decode: k_cache must have a block size >= 1");
  TORCH_CHECK(shape.num_kv_heads >= 1 && shape.num_q_heads % shape.num_kv_heads == 0,
              "flash_decode: q's head count (", shape.num_q_heads, ") must be a multiple of k_cache's KV head count (",
              shape.num_kv_heads, ")");
  if (v_cache.has_value()) {
    const at::Tensor& v = *v_cache;
    TORCH_CHECK(v.dim() == 4, "flash_decode: v_cache must be 4-D [num_blocks, block_size, Hkv, Dv], got shape ",
                v.sizes());
    TORCH_CHECK(v.scalar_type() == k_cache.scalar_type(), "flash_decode: v_cache must have k_cache's dtype (",
                k_cache.scalar_type(), "), got ", v.scalar_type());
    TORCH_CHECK(v.size(0) == shape.num_blocks && v.size(1) == shape.block_size && v.size(2) == shape.num_kv_heads,
                "flash_decode: v_cache must match k_cache in [num_blocks, block_size, Hkv] = ",
                k_cache.sizes().slice(0, 3), ", got ", v.sizes());
    TORCH_CHECK(head_dim_v == -1 || head_dim_v == v.size(3), "flash_decode: head_dim_v (", head_dim_v,
                ") must be -1 or v_cache's head dim (", v.size(3), ")");
    shape.head_dim_v = v.size(3);
    TORCH_CHECK(v.device() == q.device(), "flash_decode: v_cache must be on ", q.device(), ", got ", v.device());
    TORCH_CHECK(last_dim_contiguous(v), "flash_decode: v_cache's last dim must be contiguous (stride 1), got strides ",
                v.strides());
  } else {
    shape.head_dim_v = head_dim_v == -1 ? shape.head_dim_k : head_dim_v;
    TORCH_CHECK(shape.head_dim_v >= 1 && shape.head_dim_v <= shape.head_dim_k,
                "flash_decode: with v_cache=None (MLA), head_dim_v must be -1 or in [1, Dk=", shape.head_dim_k,
                "], got ", head_dim_v);
    TORCH_CHECK(!v_scale.has_value(),
                "flash_decode: v_scale must be None when v_cache is None (V comes from k_cache and uses k_scale)");
  }
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == shape.batch,
              "flash_decode: block_table must be 2-D [B=", shape.batch, ", max_blocks], got shape ",
              block_table.sizes());
  TORCH_CHECK(block_table.scalar_type() == at::kInt, "flash_decode: block_table must be int32, got ",
              block_table.scalar_type());
  shape.max_blocks_per_seq = block_table.size(1);
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == shape.batch,
              "flash_decode: seq_lens must be 1-D [B=", shape.batch, "], got shape ", seq_lens.sizes());
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt, "flash_decode: seq_lens must be int32, got ",
              seq_lens.scalar_type());
  for (const auto& [tensor, name] : {std::pair<const at::Tensor&, const char*>{k_cache, "k_cache"},
                                     {block_table, "block_table"}, {seq_lens, "seq_lens"}}) {
    TORCH_CHECK(tensor.device() == q.device(), "flash_decode: ", name, " must be on ", q.device(), " (q's device), got ",
                tensor.device());
  }
  TORCH_CHECK(last_dim_contiguous(q), "flash_decode: q's last dim must be contiguous (stride 1), got strides ", q.strides());
  TORCH_CHECK(last_dim_contiguous(k_cache), "flash_decode: k_cache's last dim must be contiguous (stride 1), got strides ",
              k_cache.strides());
  // The kernels use it as a float, times log2(e): beyond that range it would become inf there.
  TORCH_CHECK(std::isfinite(softmax_scale) &&
                  std::isfinite(static_cast<float>(softmax_scale) * 1.4426950408889634f),
              "flash_decode: softmax_scale must be finite in float32 times log2(e) (|x| <= 2.3e38), got ",
              softmax_scale);
  TORCH_CHECK(num_splits >= 0, "flash_decode: num_splits must be >= 0 (0 = heuristic), got ", num_splits);
  if (query_key_lens.has_value()) {
    const at::Tensor& lens = *query_key_lens;
    TORCH_CHECK(lens.dim() == 2 && lens.size(0) == shape.batch && lens.size(1) == shape.num_queries,
                "flash_decode: query_key_lens must be 2-D [B=", shape.batch, ", Q=", shape.num_queries, "], got shape ",
                lens.sizes());
    TORCH_CHECK(lens.scalar_type() == at::kInt, "flash_decode: query_key_lens must be int32, got ", lens.scalar_type());
    TORCH_CHECK(lens.device() == q.device(), "flash_decode: query_key_lens must be on ", q.device(),
                " (q's device), got ", lens.device());
  }
  if (kv_fp8) {
    TORCH_CHECK(k_scale.has_value(), "flash_decode: k_scale is required when k_cache is float8_e4m3fn");
    TORCH_CHECK(!v_cache.has_value() || v_scale.has_value(),
                "flash_decode: v_scale is required when v_cache is float8_e4m3fn");
  }
  check_scale(k_scale, "k_scale", q);
  check_scale(v_scale, "v_scale", q);
  return shape;
}

// Value checks of block_table and seq_lens: every seq_len in [0, max_blocks * block_size],
// every block id a sequence uses in [0, num_blocks).
inline void check_flash_decode_values(const at::Tensor& block_table, const at::Tensor& seq_lens,
                                      const std::optional<at::Tensor>& query_key_lens, const FlashDecodeShape& shape) {
  const at::Tensor lens = seq_lens.cpu();
  const at::Tensor table = block_table.cpu();
  const int32_t* lens_data = lens.const_data_ptr<int32_t>();
  const int64_t capacity = block_table_capacity(shape);
  const at::Tensor visible = query_key_lens.has_value() ? query_key_lens->cpu() : at::Tensor();
  for (int64_t b = 0; b < shape.batch; ++b) {
    const int64_t length = lens_data[b * lens.stride(0)];
    TORCH_CHECK(length >= 0 && length <= capacity, "flash_decode: seq_lens[", b, "] = ", length,
                " is outside [0, max_blocks * block_size = ", capacity, "] (its block_table row has ",
                shape.max_blocks_per_seq, " blocks of ", shape.block_size, " tokens)");
    const int64_t used_blocks = (length + shape.block_size - 1) / shape.block_size;
    for (int64_t i = 0; i < used_blocks; ++i) {
      const int64_t block = table.const_data_ptr<int32_t>()[b * table.stride(0) + i * table.stride(1)];
      TORCH_CHECK(block >= 0 && block < shape.num_blocks, "flash_decode: block_table[", b, ", ", i, "] = ", block,
                  " is not a block id in [0, num_blocks = ", shape.num_blocks, ")");
    }
    if (!visible.defined()) continue;
    int64_t previous = 0;
    for (int64_t i = 0; i < shape.num_queries; ++i) {
      const int64_t count = visible.const_data_ptr<int32_t>()[b * visible.stride(0) + i * visible.stride(1)];
      TORCH_CHECK(count >= previous && count <= length, "flash_decode: query_key_lens[", b, ", ", i, "] = ", count,
                  " must be in [", previous, ", seq_lens[", b, "] = ", length,
                  "] (each query sees the first keys of the shard, no fewer than the query before it)");
      previous = count;
    }
  }
}

// Keys of the shard query i of sequence b sees: query_key_lens[b, i], or by default causal over
// the last Q keys, max(0, seq_lens[b] - Q + 1 + i). On the host: [B * Q].
inline std::vector<int64_t> flash_decode_visible_keys(const at::Tensor& seq_lens,
                                                      const std::optional<at::Tensor>& query_key_lens,
                                                      const FlashDecodeShape& shape) {
  std::vector<int64_t> visible(shape.batch * shape.num_queries);
  const at::Tensor lens = seq_lens.cpu();
  const at::Tensor given = query_key_lens.has_value() ? query_key_lens->cpu() : at::Tensor();
  for (int64_t b = 0; b < shape.batch; ++b) {
    const int64_t length = lens.const_data_ptr<int32_t>()[b * lens.stride(0)];
    for (int64_t i = 0; i < shape.num_queries; ++i) {
      visible[b * shape.num_queries + i] =
          given.defined() ? given.const_data_ptr<int32_t>()[b * given.stride(0) + i * given.stride(1)]
                          : std::max<int64_t>(0, length - shape.num_queries + 1 + i);
    }
  }
  return visible;
}

// HELIX_CHECK_INPUTS=1 turns the value checks on for CUDA inputs (each costs a device sync).
inline bool check_inputs_on_device() {
  const char* value = std::getenv("HELIX_CHECK_INPUTS");
  return value != nullptr && value[0] != '\0' && !(value[0] == '0' && value[1] == '\0');
}

inline std::tuple<at::Tensor, at::Tensor> allocate_flash_decode_outputs(const at::Tensor& q,
                                                                        const FlashDecodeShape& shape) {
  if (shape.q_4d) {
    at::Tensor out = at::empty({shape.batch, shape.num_queries, shape.num_q_heads, shape.head_dim_v}, q.options());
    at::Tensor lse = at::empty({shape.batch, shape.num_queries, shape.num_q_heads}, q.options().dtype(at::kFloat));
    return {out, lse};
  }
  at::Tensor out = at::empty({shape.batch, shape.num_q_heads, shape.head_dim_v}, q.options());
  at::Tensor lse = at::empty({shape.batch, shape.num_q_heads}, q.options().dtype(at::kFloat));
  return {out, lse};
}

}  // namespace helix
