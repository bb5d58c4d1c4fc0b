// merge_states, CPU: parallel over (b, h) rows; the merge math is helix/softmax_merge.h,
// the same functions the CUDA kernel calls, and the row loops are merge_rows.h, shared with
// hopb_combine (whose result must equal merge_states' bit for bit).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "helix/softmax_merge.h"
#include "merge_rows.h"
#include "merge_states_args.h"

namespace helix {
namespace {

template <typename T>
void merge_states_cpu_impl(const at::Tensor& parts_out, const at::Tensor& parts_lse,
                           at::Tensor& out, at::Tensor& out_lse) {
  const int num_parts = static_cast<int>(parts_out.size(0));
  const int64_t num_heads = parts_out.size(2);
  const int64_t head_dim = parts_out.size(3);
  const int64_t num_rows = parts_out.size(1) * num_heads;
  const T* parts_out_data = parts_out.const_data_ptr<T>();
  const float* parts_lse_data = parts_lse.const_data_ptr<float>();
  T* out_data = out.mutable_data_ptr<T>();
  float* out_lse_data = out_lse.mutable_data_ptr<float>();
  const auto out_strides = parts_out.strides();
  const auto lse_strides = parts_lse.strides();
  const bool contiguous = out_strides[3] == 1 || head_dim == 1;

  // About 64K elements of work per task keeps threading overhead small for tiny D.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, head_dim * num_parts));
  at::parallel_for(0, num_rows, grain, [&](int64_t row_begin, int64_t row_end) {
    std::vector<float> accumulator(head_dim);
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t batch = row / num_heads, head = row - batch * num_heads;
      const float* row_lse = parts_lse_data + batch * lse_strides[1] + head * lse_strides[2];
      const T* row_out = parts_out_data + batch * out_strides[1] + head * out_strides[2];
      const MergeScale total = merge_scale(num_parts, [&](int part) { return row_lse[part * lse_strides[0]]; });
      std::fill(accumulator.begin(), accumulator.end(), 0.0f);
      for (int part = 0; part < num_parts; ++part) {
        const float weight = merge_weight(row_lse[part * lse_strides[0]], total);
        if (weight == 0.0f) continue;  // absent part: its output is never read
        const T* values = row_out + part * out_strides[0];
        if (contiguous) {
          accumulate_row(values, weight, head_dim, accumulator.data());
        } else {
          for (int64_t d = 0; d < head_dim; ++d) {
            accumulator[d] += weight * static_cast<float>(values[d * out_strides[3]]);
          }
        }
      }
      store_row(accumulator.data(), total.normalizer, head_dim, out_data + row * head_dim);
      out_lse_data[row] = total.lse;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> merge_states_cpu(const at::Tensor& parts_out,
                                                    const at::Tensor& parts_lse) {
  check_merge_states_args(parts_out, parts_lse);
  TORCH_CHECK(parts_out.device().is_cpu(), "merge_states: parts_out must be a CPU tensor here");
  auto [out, out_lse] = allocate_merge_states_outputs(parts_out);
  if (out.numel() == 0) return {out, out_lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, parts_out.scalar_type(),
                                  "merge_states_cpu", [&] {
                                    merge_states_cpu_impl<scalar_t>(parts_out, parts_lse, out,
                                                                    out_lse);
                                  });
  return {out, out_lse};
}

}  // namespace
}  // namespace helix

TORCH_LIBRARY_IMPL(helix, CPU, m) { m.impl("merge_states", &helix::merge_states_cpu); }
