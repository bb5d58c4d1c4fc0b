// HOP-B fused combine, CPU: peers' partial states are read in place (views of shared-memory
// buffers mapped into this process) once each peer's flag for the chunk has reached this
// rank's epoch, and merged with the merge_states math (hopb_combine) or summed (hopb_all_reduce). Flags use C++20 atomic_ref with
// release (signal) / acquire (combine) ordering, like the GPU kernel's st.release.sys /
// ld.acquire.sys; a peer that never signals fails the op after timeout_s.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "helix/softmax_merge.h"
#include "hopb_args.h"
#include "merge_rows.h"

namespace helix {
namespace {

void hopb_signal_cpu(at::Tensor& flags, at::Tensor& epoch, int64_t chunk) {
  check_hopb_signal_args(flags, epoch, chunk);
  TORCH_CHECK(flags.device().is_cpu(), "hopb_signal: flags must be a CPU tensor here");
  int32_t* epoch_data = epoch.mutable_data_ptr<int32_t>();
  const int32_t value = hopb_next_epoch(epoch_data[chunk]);
  epoch_data[chunk] = value;
  // Release: the partial states this rank wrote before are visible to whoever sees the flag.
  std::atomic_ref<int32_t>(flags.mutable_data_ptr<int32_t>()[chunk]).store(value, std::memory_order_release);
}

// Wait (acquire loads, yielding the core between looks: CPU ranks often outnumber the cores)
// until every peer's flag for `chunk` has reached this rank's epoch; a peer that does not
// signal within timeout_s is recorded in error (1 + peer) and fails the op.
void wait_for_peers(const char* op, const std::vector<at::Tensor>& peer_flags, const at::Tensor& epoch, int64_t chunk,
                    double timeout_s, at::Tensor& error) {
  const int32_t expected = epoch.const_data_ptr<int32_t>()[chunk];
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  for (size_t p = 0; p < peer_flags.size(); ++p) {
    std::atomic_ref<int32_t> flag(const_cast<int32_t*>(peer_flags[p].const_data_ptr<int32_t>())[chunk]);
    int32_t seen;
    while (!hopb_flag_reached(seen = flag.load(std::memory_order_acquire), expected)) {
      if (std::chrono::steady_clock::now() > deadline) {
        error.mutable_data_ptr<int32_t>()[0] = static_cast<int32_t>(p) + 1;
        TORCH_CHECK(false, op, ": peer ", p, " did not signal chunk ", chunk, " within ", timeout_s,
                    " s (its flag is ", seen, ", this rank expects epoch ", expected, ")");
      }
      std::this_thread::yield();
    }
  }
}

template <typename T>
void merge_parts(const std::vector<at::Tensor>& peer_out, const std::vector<at::Tensor>& peer_lse, at::Tensor& out,
                 at::Tensor& lse) {
  const int parts = static_cast<int>(peer_out.size());
  const int64_t rows = out.size(0) * out.size(1), dim = out.size(2);
  std::vector<const T*> values(parts);
  std::vector<const float*> lses(parts);
  for (int p = 0; p < parts; ++p) {
    values[p] = peer_out[p].const_data_ptr<T>();
    lses[p] = peer_lse[p].const_data_ptr<float>();
  }
  T* out_data = out.mutable_data_ptr<T>();
  float* lse_data = lse.mutable_data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> accumulator(dim);
    for (int64_t row = begin; row < end; ++row) {
      const MergeScale total = merge_scale(parts, [&](int p) { return lses[p][row]; });
      std::fill(accumulator.begin(), accumulator.end(), 0.0f);
      for (int p = 0; p < parts; ++p) {
        const float weight = merge_weight(lses[p][row], total);
        if (weight == 0.0f) continue;
        accumulate_row(values[p] + row * dim, weight, dim, accumulator.data());
      }
      store_row(accumulator.data(), total.normalizer, dim, out_data + row * dim);
      lse_data[row] = total.lse;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> hopb_combine_cpu(const std::vector<at::Tensor>& peer_out,
                                                    const std::vector<at::Tensor>& peer_lse,
                                                    const std::vector<at::Tensor>& peer_flags,
                                                    const at::Tensor& epoch, int64_t chunk, double timeout_s,
                                                    at::Tensor& error) {
  const auto [rows, heads, dim] =
      check_hopb_combine_args(peer_out, peer_lse, peer_flags, epoch, chunk, timeout_s, error);
  TORCH_CHECK(peer_out[0].device().is_cpu(), "hopb_combine: the peer views must be CPU tensors here");
  wait_for_peers("hopb_combine", peer_flags, epoch, chunk, timeout_s, error);
  at::Tensor out = at::empty({rows, heads, dim}, peer_out[0].options());
  at::Tensor lse = at::empty({rows, heads}, peer_out[0].options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "hopb_combine_cpu",
                                  [&] { merge_parts<scalar_t>(peer_out, peer_lse, out, lse); });
  return {out, lse};
}

// out = ((0 + part_0) + part_1) + ... in fp32, in peer order (as the CUDA kernel): every rank
// passing the same peers in the same order gets the same bits.
template <typename T>
void sum_parts(const std::vector<at::Tensor>& peer_parts, at::Tensor& out) {
  const int64_t count = out.numel();
  T* out_data = out.mutable_data_ptr<T>();
  at::parallel_for(0, count, 4096, [&](int64_t begin, int64_t end) {
    std::vector<float> accumulator(end - begin, 0.0f);
    for (const at::Tensor& part : peer_parts) {
      accumulate_row(part.const_data_ptr<T>() + begin, 1.0f, end - begin, accumulator.data());
    }
    store_row(accumulator.data(), 1.0f, end - begin, out_data + begin);
  });
}

at::Tensor hopb_all_reduce_cpu(const std::vector<at::Tensor>& peer_parts, const std::vector<at::Tensor>& peer_flags,
                               const at::Tensor& epoch, int64_t chunk, double timeout_s, at::Tensor& error) {
  check_hopb_all_reduce_args(peer_parts, peer_flags, epoch, chunk, timeout_s, error);
  TORCH_CHECK(peer_parts[0].device().is_cpu(), "hopb_all_reduce: the peer views must be CPU tensors here");
  wait_for_peers("hopb_all_reduce", peer_flags, epoch, chunk, timeout_s, error);
  at::Tensor out = at::empty(peer_parts[0].sizes(), peer_parts[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "hopb_all_reduce_cpu",
                                  [&] { sum_parts<scalar_t>(peer_parts, out); });
  return out;
}

}  // namespace
}  // namespace helix

TORCH_LIBRARY_IMPL(helix, CPU, m) {
  m.impl("hopb_signal", &helix::hopb_signal_cpu);
  m.impl("hopb_combine", &helix::hopb_combine_cpu);
  m.impl("hopb_all_reduce", &helix::hopb_all_reduce_cpu);
}
