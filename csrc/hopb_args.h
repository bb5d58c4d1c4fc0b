// Argument checks of the HOP-B peer-memory ops (hopb_signal, hopb_combine, hopb_all_reduce), shared by
// their CPU and CUDA launchers. These ops are internal: helix_ext.parallel.FusedExchange
// owns the (symmetric / shared) buffers whose views it passes, so no raw pointer crosses
// the Python API.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <vector>

#include "helix/hopb.h"

namespace helix {

inline void check_hopb_signal_args(const at::Tensor& flags, const at::Tensor& epoch, int64_t chunk) {
  TORCH_CHECK(flags.scalar_type() == at::kInt && flags.dim() == 1 && flags.is_contiguous(),
              "hopb_signal: flags must be a contiguous 1-D int32 tensor, got ", flags.scalar_type(), " ", flags.sizes());
  TORCH_CHECK(epoch.scalar_type() == at::kInt && epoch.dim() == 1 && epoch.is_contiguous(),
              "hopb_signal: epoch must be a contiguous 1-D int32 tensor, got ", epoch.scalar_type(), " ", epoch.sizes());
  TORCH_CHECK(chunk >= 0 && chunk < flags.size(0) && chunk < epoch.size(0), "hopb_signal: chunk ", chunk,
              " is outside flags (", flags.size(0), ") or epoch (", epoch.size(0), ")");
  TORCH_CHECK(flags.device() == epoch.device(), "hopb_signal: flags and epoch must be on one device");
}

// The checks the two waiting ops share: each peer's flag (read by raw pointer at [chunk]: a
// strided or expanded view would read another slot), this rank's epoch, the error flag and the
// bounded timeout, every tensor on `device`.
inline void check_hopb_wait_args(const char* op, const std::vector<at::Tensor>& peer_flags, const at::Tensor& epoch,
                                 int64_t chunk, double timeout_s, const at::Tensor& error, const at::Device& device) {
  for (size_t i = 0; i < peer_flags.size(); ++i) {
    TORCH_CHECK(peer_flags[i].scalar_type() == at::kInt && peer_flags[i].dim() == 1 &&
                    peer_flags[i].is_contiguous() && chunk >= 0 && chunk < peer_flags[i].size(0),
                op, ": peer_flags[", i, "] must be a contiguous 1-D int32 tensor with a flag for chunk ", chunk,
                ", got ", peer_flags[i].scalar_type(), " ", peer_flags[i].sizes(), " with strides ",
                peer_flags[i].strides());
    TORCH_CHECK(peer_flags[i].device() == device, op, ": every peer view must be on ", device, " (peer ", i,
                " is not)");
  }
  TORCH_CHECK(epoch.scalar_type() == at::kInt && epoch.dim() == 1 && epoch.is_contiguous() && chunk < epoch.size(0) &&
                  epoch.device() == device,
              op, ": epoch must be a contiguous 1-D int32 tensor on ", device, " with an entry for chunk ", chunk,
              ", got ", epoch.scalar_type(), " ", epoch.sizes(), " with strides ", epoch.strides());
  TORCH_CHECK(error.scalar_type() == at::kInt && error.numel() >= 1 && error.device() == device, op,
              ": error must be an int32 tensor on ", device);
  TORCH_CHECK(timeout_s > 0 && timeout_s <= kHopbMaxTimeoutSeconds, op, ": timeout_s must be in (0, ",
              kHopbMaxTimeoutSeconds, "] seconds (the wait is bounded), got ", timeout_s);
}

// Returns (rows, heads, head_dim) of the parts.
inline std::tuple<int64_t, int64_t, int64_t> check_hopb_combine_args(
    const std::vector<at::Tensor>& peer_out, const std::vector<at::Tensor>& peer_lse,
    const std::vector<at::Tensor>& peer_flags, const at::Tensor& epoch, int64_t chunk, double timeout_s,
    const at::Tensor& error) {
  const size_t peers = peer_out.size();
  TORCH_CHECK(peers >= 1 && peers <= kHopbMaxPeers, "hopb_combine: needs 1 to ", kHopbMaxPeers,
              " peers, got ", peers);
  TORCH_CHECK(peer_lse.size() == peers && peer_flags.size() == peers, "hopb_combine: peer_out, peer_lse and "
              "peer_flags must list the same peers, got ", peers, ", ", peer_lse.size(), " and ", peer_flags.size());
  const at::Tensor& first = peer_out[0];
  TORCH_CHECK(first.dim() == 3, "hopb_combine: peer_out[0] must be 3-D [rows, heads, D], got ", first.sizes());
  const auto dtype = first.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "hopb_combine: peer_out must be float32, bfloat16 or float16, got ", dtype);
  for (size_t i = 0; i < peers; ++i) {
    TORCH_CHECK(peer_out[i].sizes() == first.sizes() && peer_out[i].scalar_type() == dtype &&
                    peer_out[i].is_contiguous(),
                "hopb_combine: peer_out[", i, "] must be contiguous with peer_out[0]'s shape ", first.sizes(),
                " and dtype ", dtype, ", got ", peer_out[i].sizes(), " ", peer_out[i].scalar_type());
    TORCH_CHECK(peer_lse[i].scalar_type() == at::kFloat && peer_lse[i].dim() == 2 &&
                    peer_lse[i].size(0) == first.size(0) && peer_lse[i].size(1) == first.size(1) &&
                    peer_lse[i].is_contiguous(),
                "hopb_combine: peer_lse[", i, "] must be a contiguous float32 [rows, heads] = ",
                first.sizes().slice(0, 2), ", got ", peer_lse[i].scalar_type(), " ", peer_lse[i].sizes());
    TORCH_CHECK(peer_out[i].device() == first.device() && peer_lse[i].device() == first.device(),
                "hopb_combine: every peer view must be on ", first.device(), " (peer ", i, " is not)");
  }
  check_hopb_wait_args("hopb_combine", peer_flags, epoch, chunk, timeout_s, error, first.device());
  TORCH_CHECK(first.size(2) >= 1, "hopb_combine: peer_out must have a head dim D >= 1, got shape ", first.sizes());
  return {first.size(0), first.size(1), first.size(2)};
}

// Returns the number of elements of each part.
inline int64_t check_hopb_all_reduce_args(const std::vector<at::Tensor>& peer_parts,
                                          const std::vector<at::Tensor>& peer_flags, const at::Tensor& epoch,
                                          int64_t chunk, double timeout_s, const at::Tensor& error) {
  const size_t peers = peer_parts.size();
  TORCH_CHECK(peers >= 1 && peers <= kHopbMaxPeers, "hopb_all_reduce: needs 1 to ", kHopbMaxPeers,
              " peers, got ", peers);
  TORCH_CHECK(peer_flags.size() == peers, "hopb_all_reduce: peer_parts and peer_flags must list the same peers, got ",
              peers, " and ", peer_flags.size());
  const at::Tensor& first = peer_parts[0];
  const auto dtype = first.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "hopb_all_reduce: peer_parts must be float32, bfloat16 or float16, got ", dtype);
  for (size_t i = 0; i < peers; ++i) {
    TORCH_CHECK(peer_parts[i].sizes() == first.sizes() && peer_parts[i].scalar_type() == dtype &&
                    peer_parts[i].is_contiguous(),
                "hopb_all_reduce: peer_parts[", i, "] must be contiguous with peer_parts[0]'s shape ", first.sizes(),
                " and dtype ", dtype, ", got ", peer_parts[i].sizes(), " ", peer_parts[i].scalar_type());
    TORCH_CHECK(peer_parts[i].device() == first.device(),
                "hopb_all_reduce: every peer view must be on ", first.device(), " (peer ", i, " is not)");
  }
  check_hopb_wait_args("hopb_all_reduce", peer_flags, epoch, chunk, timeout_s, error, first.device());
  return first.numel();
}

}  // namespace helix
