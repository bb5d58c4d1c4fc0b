// Argument checks and output allocation for merge_states, shared by its CPU and CUDA
// launchers so both reject the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <tuple>

namespace helix {

inline void check_merge_states_args(const at::Tensor& parts_out, const at::Tensor& parts_lse) {
  TORCH_CHECK(parts_out.dim() == 4, "merge_states: parts_out must be 4-D [P, B, H, D], got ",
              parts_out.dim(), "-D with shape ", parts_out.sizes());
  TORCH_CHECK(parts_lse.dim() == 3, "merge_states: parts_lse must be 3-D [P, B, H], got ",
              parts_lse.dim(), "-D with shape ", parts_lse.sizes());
  const auto dtype = parts_out.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "merge_states: parts_out must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(parts_lse.scalar_type() == at::kFloat,
              "merge_states: parts_lse must be float32, got ", parts_lse.scalar_type());
  TORCH_CHECK(parts_out.device() == parts_lse.device(),
              "merge_states: parts_out and parts_lse must be on the same device, got ",
              parts_out.device(), " and ", parts_lse.device());
  TORCH_CHECK(parts_lse.size(0) == parts_out.size(0),
              "merge_states: parts_lse has ", parts_lse.size(0),
              " parts (dim 0) but parts_out has ", parts_out.size(0));
  TORCH_CHECK(parts_lse.size(1) == parts_out.size(1) && parts_lse.size(2) == parts_out.size(2),
              "merge_states: parts_lse must be [P, B, H] = ",
              parts_out.sizes().slice(0, 3), " to match parts_out, got ", parts_lse.sizes());
  TORCH_CHECK(parts_out.size(3) >= 1, "merge_states: parts_out must have a head dim D >= 1");
  TORCH_CHECK(parts_out.size(0) <= INT32_MAX && parts_out.size(2) <= INT32_MAX,
              "merge_states: parts_out has too many parts or heads: ", parts_out.sizes());
}

// Outputs: out [B, H, D] in parts_out's dtype, lse [B, H] fp32, both contiguous.
inline std::tuple<at::Tensor, at::Tensor> allocate_merge_states_outputs(const at::Tensor& parts_out) {
  const auto batch = parts_out.size(1), heads = parts_out.size(2), head_dim = parts_out.size(3);
  at::Tensor out = at::empty({batch, heads, head_dim}, parts_out.options());
  at::Tensor lse = at::empty({batch, heads}, parts_out.options().dtype(at::kFloat));
  return {out, lse};
}

}  // namespace helix
