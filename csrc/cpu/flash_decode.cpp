// flash_decode, CPU: split-KV decode attention over a paged cache, fp32 online softmax.
// Work items are (sequence, KV head, chunk of tokens); each computes every query head of its
// GQA group with the online-softmax functions of helix/softmax_merge.h (the CUDA kernel's),
// and chunks of one sequence are merged with the same merge math as merge_states.
// Like the CUDA kernel, probabilities are rounded to q's dtype before they weight V (a
// no-op for float32, which only this CPU kernel takes: the runtime's fp32 test models).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "flash_decode_args.h"
#include "helix/fp8.h"
#include "helix/softmax_merge.h"

namespace helix {
namespace {

constexpr int64_t kChunkTokens = 2048;  // tokens per work item (and per partial state)
constexpr int64_t kTileTokens = 32;     // tokens decoded to fp32 at once, shared by the group

template <typename T>
float element_to_float(const T* address) {
  return static_cast<float>(*address);
}

template <>
float element_to_float<uint8_t>(const uint8_t* address) {
  return fp8_e4m3_to_float(*address);
}

struct CacheView {
  const void* data;
  int64_t stride_block, stride_token, stride_head;
};

struct WorkItem {
  int64_t batch, kv_head, token_begin, token_end;
};

template <typename QT, typename KVT>
class FlashDecodeCpu {
 public:
  FlashDecodeCpu(const at::Tensor& q, const at::Tensor& k_cache, const std::optional<at::Tensor>& v_cache,
                 const at::Tensor& block_table, const FlashDecodeShape& shape, float softmax_scale, float k_scale,
                 float v_scale)
      : shape_(shape),
        group_size_(shape.num_q_heads / shape.num_kv_heads),
        q_(q.const_data_ptr<QT>()),
        q_strides_{q.stride(0), q.stride(1)},
        block_table_(block_table.const_data_ptr<int32_t>()),
        block_table_strides_{block_table.stride(0), block_table.stride(1)},
        score_scale_log2_(softmax_scale * k_scale * kLog2e),
        // MLA: V is part of the K entry, dequantized with k_scale.
        value_scale_(shape.mla ? k_scale : v_scale) {
    key_ = {k_cache.const_data_ptr(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
    const at::Tensor& values = v_cache.has_value() ? *v_cache : k_cache;
    value_ = {values.const_data_ptr(), values.stride(0), values.stride(1), values.stride(2)};
  }

  // Partial state of one work item: out [G, Dv] (normalized, fp32) and lse [G].
  void run(const WorkItem& item, float* partial_out, float* partial_lse) const {
    const int64_t group = group_size_, dim_k = shape_.head_dim_k, dim_v = shape_.head_dim_v;
    std::vector<float> queries(group * dim_k), keys(kTileTokens * dim_k), values(kTileTokens * dim_v);
    std::vector<float> scores(kTileTokens), accumulator(group * dim_v, 0.0f);
    std::vector<SoftmaxState> states(group, softmax_state_empty());
    for (int64_t h = 0; h < group; ++h) {
      const QT* row = q_ + item.batch * q_strides_[0] + (item.kv_head * group + h) * q_strides_[1];
      for (int64_t d = 0; d < dim_k; ++d) queries[h * dim_k + d] = static_cast<float>(row[d]);
    }
    for (int64_t first = item.token_begin; first < item.token_end; first += kTileTokens) {
      const int64_t count = std::min(kTileTokens, item.token_end - first);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t token = first + i;
        const int64_t block = block_table_[item.batch * block_table_strides_[0] +
                                           (token / shape_.block_size) * block_table_strides_[1]];
        const int64_t offset = token % shape_.block_size;
        decode_row(key_, block, offset, item.kv_head, dim_k, &keys[i * dim_k]);
        decode_row(value_, block, offset, item.kv_head, dim_v, &values[i * dim_v]);
      }
      for (int64_t h = 0; h < group; ++h) {
        const float* query = &queries[h * dim_k];
        float tile_max = neg_inf();
        for (int64_t i = 0; i < count; ++i) {
          float dot = 0.0f;
          for (int64_t d = 0; d < dim_k; ++d) dot += query[d] * keys[i * dim_k + d];
          scores[i] = dot * score_scale_log2_;
          tile_max = std::max(tile_max, scores[i]);
        }
        SoftmaxState& state = states[h];
        float* acc = &accumulator[h * dim_v];
        const float alpha = online_softmax_rescale(state, tile_max);
        if (alpha != 1.0f) {
          for (int64_t d = 0; d < dim_v; ++d) acc[d] *= alpha;
        }
        const float offset = online_softmax_offset(state);
        for (int64_t i = 0; i < count; ++i) {
          const float probability = exp2f(scores[i] - offset);
          state.sum += probability;
          // Rounded to q's dtype as the tensor-core kernel feeds it to its P*V product.
          const float weight = static_cast<float>(static_cast<QT>(probability));
          if (weight == 0.0f) continue;
          for (int64_t d = 0; d < dim_v; ++d) acc[d] += weight * values[i * dim_v + d];
        }
      }
    }
    for (int64_t h = 0; h < group; ++h) {
      const SoftmaxState& state = states[h];
      const float normalizer = online_softmax_normalizer(state, value_scale_);
      for (int64_t d = 0; d < dim_v; ++d) partial_out[h * dim_v + d] = accumulator[h * dim_v + d] * normalizer;
      partial_lse[h] = online_softmax_lse(state);
    }
  }

 private:
  static void decode_row(const CacheView& cache, int64_t block, int64_t offset, int64_t head, int64_t count,
                         float* destination) {
    const KVT* row = static_cast<const KVT*>(cache.data) + block * cache.stride_block +
                     offset * cache.stride_token + head * cache.stride_head;
    for (int64_t d = 0; d < count; ++d) destination[d] = element_to_float<KVT>(row + d);
  }

  FlashDecodeShape shape_;
  int64_t group_size_;
  const QT* q_;
  int64_t q_strides_[2];
  const int32_t* block_table_;
  int64_t block_table_strides_[2];
  CacheView key_, value_;
  float score_scale_log2_, value_scale_;
};

template <typename QT, typename KVT>
void flash_decode_cpu_impl(const at::Tensor& q, const at::Tensor& k_cache, const std::optional<at::Tensor>& v_cache,
                           const at::Tensor& block_table, const at::Tensor& seq_lens, const FlashDecodeShape& shape,
                           float softmax_scale, float k_scale, float v_scale, at::Tensor& out, at::Tensor& lse) {
  const FlashDecodeCpu<QT, KVT> kernel(q, k_cache, v_cache, block_table, shape, softmax_scale, k_scale, v_scale);
  const int64_t group = shape.num_q_heads / shape.num_kv_heads, dim_v = shape.head_dim_v;
  const int32_t* lengths = seq_lens.const_data_ptr<int32_t>();

  // Work items, grouped per (sequence, KV head) so that a merge reads a contiguous run.
  std::vector<WorkItem> items;
  std::vector<int64_t> first_item(shape.batch * shape.num_kv_heads + 1);
  for (int64_t b = 0; b < shape.batch; ++b) {
    const int64_t length = lengths[b * seq_lens.stride(0)];
    const int64_t chunks = std::max<int64_t>(1, (length + kChunkTokens - 1) / kChunkTokens);
    for (int64_t g = 0; g < shape.num_kv_heads; ++g) {
      first_item[b * shape.num_kv_heads + g] = static_cast<int64_t>(items.size());
      for (int64_t c = 0; c < chunks; ++c) {
        items.push_back({b, g, c * kChunkTokens, std::min(length, (c + 1) * kChunkTokens)});
      }
    }
  }
  first_item.back() = static_cast<int64_t>(items.size());

  std::vector<float> partial_out(items.size() * group * dim_v), partial_lse(items.size() * group);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      kernel.run(items[i], &partial_out[i * group * dim_v], &partial_lse[i * group]);
    }
  });

  QT* out_data = out.mutable_data_ptr<QT>();
  float* lse_data = lse.mutable_data_ptr<float>();
  at::parallel_for(0, shape.batch * shape.num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> merged(dim_v);
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t first = first_item[pair], parts = first_item[pair + 1] - first;
      for (int64_t h = 0; h < group; ++h) {
        const auto part_lse = [&](int p) { return partial_lse[(first + p) * group + h]; };
        const MergeScale total = merge_scale(static_cast<int>(parts), part_lse);
        std::fill(merged.begin(), merged.end(), 0.0f);
        for (int64_t p = 0; p < parts; ++p) {
          const float weight = merge_weight(part_lse(static_cast<int>(p)), total);
          if (weight == 0.0f) continue;
          const float* values = &partial_out[((first + p) * group + h) * dim_v];
          for (int64_t d = 0; d < dim_v; ++d) merged[d] += weight * values[d];
        }
        const int64_t row = (pair / shape.num_kv_heads) * shape.num_q_heads + (pair % shape.num_kv_heads) * group + h;
        for (int64_t d = 0; d < dim_v; ++d) out_data[row * dim_v + d] = static_cast<QT>(merged[d] * total.normalizer);
        lse_data[row] = total.lse;
      }
    }
  });
}

float scale_value(const std::optional<at::Tensor>& scale) {
  return scale.has_value() ? scale->item<float>() : 1.0f;
}

std::tuple<at::Tensor, at::Tensor> flash_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                    const std::optional<at::Tensor>& v_cache,
                                                    const at::Tensor& block_table, const at::Tensor& seq_lens,
                                                    double softmax_scale, int64_t head_dim_v,
                                                    const std::optional<at::Tensor>& k_scale,
                                                    const std::optional<at::Tensor>& v_scale, int64_t num_splits) {
  const FlashDecodeShape shape = check_flash_decode_args(q, k_cache, v_cache, block_table, seq_lens, softmax_scale,
                                                         head_dim_v, k_scale, v_scale, num_splits);
  TORCH_CHECK(q.device().is_cpu(), "flash_decode: q must be a CPU tensor here, got ", q.device());
  check_flash_decode_values(block_table, seq_lens, shape);
  auto [out, lse] = allocate_flash_decode_outputs(q, shape);
  if (lse.numel() == 0) return {out, lse};
  const float k_multiplier = scale_value(k_scale), v_multiplier = scale_value(v_scale);
  const auto run = [&](auto q_type, auto kv_type) {
    using QT = decltype(q_type);
    using KVT = decltype(kv_type);
    flash_decode_cpu_impl<QT, KVT>(q, k_cache, v_cache, block_table, seq_lens, shape,
                                   static_cast<float>(softmax_scale), k_multiplier, v_multiplier, out, lse);
  };
  if (q.scalar_type() == at::kBFloat16) {
    shape.kv_fp8 ? run(c10::BFloat16(), uint8_t()) : run(c10::BFloat16(), c10::BFloat16());
  } else if (q.scalar_type() == at::kHalf) {
    shape.kv_fp8 ? run(c10::Half(), uint8_t()) : run(c10::Half(), c10::Half());
  } else {
    shape.kv_fp8 ? run(float(), uint8_t()) : run(float(), float());  // fp32: probabilities stay fp32
  }
  return {out, lse};
}

}  // namespace
}  // namespace helix

TORCH_LIBRARY_IMPL(helix, CPU, m) { m.impl("flash_decode", &helix::flash_decode_cpu); }
