// The schema of every helix op, written once: torch.ops.helix (csrc/ops.cpp) and the SIMT host
// runtime's emulated-CUDA backend torch.ops.helix_simt (csrc/simt/ops.cpp) define the same ops.
#pragma once

#include <torch/library.h>

namespace helix {

inline void define_op_schemas(torch::Library& m) {
  m.def(
      "merge_states(Tensor parts_out, Tensor parts_lse) -> (Tensor out, Tensor lse)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "flash_decode(Tensor q, Tensor k_cache, Tensor? v_cache, Tensor block_table, Tensor seq_lens, "
      "float softmax_scale, int head_dim_v=-1, Tensor? k_scale=None, Tensor? v_scale=None, "
      "int num_splits=0, Tensor? query_key_lens=None) -> (Tensor out, Tensor lse)",
      {at::Tag::pt2_compliant_tag});
  m.def("quantize_fp4(Tensor x, str fmt, Tensor? global_scale=None) -> (Tensor packed, Tensor block_scales, "
        "Tensor global_scale)",
        {at::Tag::pt2_compliant_tag});
  m.def("dequantize_fp4(Tensor packed, Tensor block_scales, Tensor global_scale, str fmt, ScalarType dtype) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("fp4_grouped_gemm(Tensor x, Tensor w, Tensor w_scales, Tensor w_global_scale, Tensor offs, str fmt) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // HOP-B fused exchange (internal to helix_ext.parallel.FusedExchange, which owns the buffers).
  m.def("hopb_signal(Tensor(a!) flags, Tensor(b!) epoch, int chunk) -> ()");
  m.def("hopb_combine(Tensor[] peer_out, Tensor[] peer_lse, Tensor[] peer_flags, Tensor epoch, int chunk, "
        "float timeout_s, Tensor(a!) error) -> (Tensor out, Tensor lse)");
  // The TP all-reduce over the same peer memory (internal to helix_ext.parallel.PeerAllReduce).
  m.def("hopb_all_reduce(Tensor[] peer_parts, Tensor[] peer_flags, Tensor epoch, int chunk, float timeout_s, "
        "Tensor(a!) error) -> Tensor");
}

}  // namespace helix
