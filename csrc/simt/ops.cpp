// torch.ops.helix_simt: the CUDA kernels of csrc/include/helix run on CPU tensors by the SIMT
// host runtime, through the same launcher bodies as the CUDA ops (csrc/cuda/*_launch.h), so a
// launcher's grid, split plan or alignment fallback is exercised too. Every op has the schema
// of its torch.ops.helix twin (csrc/op_schemas.h).
//
// Each op call: the device-independent argument checks the CPU and CUDA ops make, then the
// launch with a LaunchContext of the emulated device (settings().multiprocessor_count SMs);
// tensors the launcher allocates (outputs, workspaces) come from a CPU allocator that fills
// them with the poison byte, so a kernel that leaves an output element unwritten is seen.
#include <pybind11/pybind11.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <c10/core/CPUAllocator.h>

#include <cstring>
#include <mutex>
#include <stdexcept>

#include "cuda/flash_decode_launch.h"
#include "cuda/fp4_grouped_gemm_launch.h"
#include "cuda/fp4_launch.h"
#include "cuda/hopb_combine_launch.h"
#include "cuda/merge_states_launch.h"
#include "helix/mma.cuh"
#include "helix_simt/ptx.h"
#include "op_schemas.h"

namespace helix {
namespace simt {
namespace {

// CPU allocations poisoned while an emulated op runs (outputs and workspaces never read stale
// zeros or a previous call's values).
class PoisoningAllocator final : public c10::Allocator {
 public:
  explicit PoisoningAllocator(c10::Allocator* base) : base_(base) {}
  c10::DataPtr allocate(size_t bytes) override {
    c10::DataPtr data = base_->allocate(bytes);
    if (bytes > 0) std::memset(data.get(), settings().poison, bytes);
    return data;
  }
  c10::DeleterFnPtr raw_deleter() const override { return base_->raw_deleter(); }
  void copy_data(void* destination, const void* source, std::size_t bytes) const override {
    std::memcpy(destination, source, bytes);
  }

 private:
  c10::Allocator* base_;
};

class EmulatedCall {
 public:
  explicit EmulatedCall(const char* op, const at::Tensor& tensor) {
    TORCH_CHECK(tensor.device().is_cpu(), op, ": the emulated CUDA kernels (torch.ops.helix_simt) take CPU tensors, got ",
                tensor.device());
    static std::mutex mutex;
    lock_ = std::unique_lock<std::mutex>(mutex);
    previous_ = c10::GetCPUAllocator();
    static PoisoningAllocator poisoning(c10::GetDefaultCPUAllocator());
    c10::SetCPUAllocator(&poisoning, /*priority=*/255);
  }
  ~EmulatedCall() { c10::SetCPUAllocator(previous_, 255); }
  EmulatedCall(const EmulatedCall&) = delete;
  EmulatedCall& operator=(const EmulatedCall&) = delete;

  LaunchContext context() const { return {0, settings().multiprocessor_count, nullptr}; }

 private:
  std::unique_lock<std::mutex> lock_;
  c10::Allocator* previous_ = nullptr;
};

std::tuple<at::Tensor, at::Tensor> merge_states_simt(const at::Tensor& parts_out, const at::Tensor& parts_lse) {
  check_merge_states_args(parts_out, parts_lse);
  EmulatedCall call("merge_states", parts_out);
  auto [out, out_lse] = allocate_merge_states_outputs(parts_out);
  if (out.numel() == 0) return {out, out_lse};
  launch_merge_states_op(parts_out, parts_lse, out, out_lse, call.context());
  return {out, out_lse};
}

std::tuple<at::Tensor, at::Tensor> flash_decode_simt(const at::Tensor& q, const at::Tensor& k_cache,
                                                     const std::optional<at::Tensor>& v_cache,
                                                     const at::Tensor& block_table, const at::Tensor& seq_lens,
                                                     double softmax_scale, int64_t head_dim_v,
                                                     const std::optional<at::Tensor>& k_scale,
                                                     const std::optional<at::Tensor>& v_scale, int64_t num_splits,
                                                     const std::optional<at::Tensor>& query_key_lens) {
  const FlashDecodeShape shape = check_flash_decode_args(q, k_cache, v_cache, block_table, seq_lens, softmax_scale,
                                                         head_dim_v, k_scale, v_scale, num_splits, query_key_lens);
  EmulatedCall call("flash_decode", q);
  if (check_inputs_on_device()) check_flash_decode_values(block_table, seq_lens, query_key_lens, shape);
  return flash_decode_launch::run(q, k_cache, v_cache, block_table, seq_lens, softmax_scale, k_scale, v_scale,
                                  num_splits, query_key_lens, shape, call.context());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_fp4_simt(const at::Tensor& x, c10::string_view fmt,
                                                                 const std::optional<at::Tensor>& global_scale) {
  const Fp4Format format = check_quantize_fp4_args(x, fmt, global_scale);
  EmulatedCall call("quantize_fp4", x);
  if (global_scale.has_value() && check_inputs_on_device()) {
    check_global_scale_values("quantize_fp4", "global_scale", *global_scale);
  }
  return fp4_launch::quantize(x, format, global_scale, call.context());
}

at::Tensor dequantize_fp4_simt(const at::Tensor& packed, const at::Tensor& block_scales, const at::Tensor& global_scale,
                               c10::string_view fmt, at::ScalarType dtype) {
  const Fp4Format format = check_dequantize_fp4_args(packed, block_scales, global_scale, fmt, dtype);
  EmulatedCall call("dequantize_fp4", packed);
  if (check_inputs_on_device()) check_global_scale_values("dequantize_fp4", "global_scale", global_scale);
  return fp4_launch::dequantize(packed, block_scales, global_scale, format, dtype, call.context());
}

at::Tensor fp4_grouped_gemm_simt(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scales,
                                 const at::Tensor& w_global_scale, const at::Tensor& offs, c10::string_view fmt) {
  const Fp4Format format = parse_fp4_format("fp4_grouped_gemm", fmt);
  const GroupedGemmShape shape = check_fp4_grouped_gemm_args(x, w, w_scales, w_global_scale, offs, format);
  EmulatedCall call("fp4_grouped_gemm", x);
  if (check_inputs_on_device()) {
    check_offs_values(offs, shape.tokens);
    check_global_scale_values("fp4_grouped_gemm", "w_global_scale", w_global_scale);
  }
  return fp4_grouped_gemm_launch::run(x, w, w_scales, w_global_scale, offs, format, shape, call.context());
}

void hopb_signal_simt(at::Tensor& flags, at::Tensor& epoch, int64_t chunk) {
  check_hopb_signal_args(flags, epoch, chunk);
  EmulatedCall call("hopb_signal", flags);
  hopb_launch::signal(flags, epoch, chunk, call.context());
}

std::tuple<at::Tensor, at::Tensor> hopb_combine_simt(const std::vector<at::Tensor>& peer_out,
                                                     const std::vector<at::Tensor>& peer_lse,
                                                     const std::vector<at::Tensor>& peer_flags,
                                                     const at::Tensor& epoch, int64_t chunk, double timeout_s,
                                                     at::Tensor& error) {
  const auto [rows, heads, dim] =
      check_hopb_combine_args(peer_out, peer_lse, peer_flags, epoch, chunk, timeout_s, error);
  EmulatedCall call("hopb_combine", peer_out[0]);
  return hopb_launch::combine(peer_out, peer_lse, peer_flags, epoch, chunk, timeout_s, error, rows, heads, dim,
                              call.context());
}

at::Tensor hopb_all_reduce_simt(const std::vector<at::Tensor>& peer_parts, const std::vector<at::Tensor>& peer_flags,
                                const at::Tensor& epoch, int64_t chunk, double timeout_s, at::Tensor& error) {
  const int64_t numel = check_hopb_all_reduce_args(peer_parts, peer_flags, epoch, chunk, timeout_s, error);
  EmulatedCall call("hopb_all_reduce", peer_parts[0]);
  return hopb_launch::all_reduce(peer_parts, peer_flags, epoch, chunk, timeout_s, error, numel, call.context());
}

// ---- probes: one warp runs a single PTX collective, for the fragment-table cross-check ----

void mma_probe_kernel(const uint32_t* a, const uint32_t* b, const float* c, float* d, bool bf16) {
  const int lane = static_cast<int>(threadIdx.x);
  const uint32_t fragment[4] = {a[4 * lane], a[4 * lane + 1], a[4 * lane + 2], a[4 * lane + 3]};
  float accumulator[4] = {c[4 * lane], c[4 * lane + 1], c[4 * lane + 2], c[4 * lane + 3]};
  if (bf16) {
    ptx::mma_m16n8k16<__nv_bfloat16>(accumulator, fragment, b[2 * lane], b[2 * lane + 1]);
  } else {
    ptx::mma_m16n8k16<__half>(accumulator, fragment, b[2 * lane], b[2 * lane + 1]);
  }
  for (int i = 0; i < 4; ++i) d[4 * lane + i] = accumulator[i];
}

// a [32, 4] int32 (A registers per lane), b [32, 2] int32, c [32, 4] fp32 -> d [32, 4] fp32.
at::Tensor probe_mma(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool bf16) {
  TORCH_CHECK(a.sizes() == at::IntArrayRef({32, 4}) && a.scalar_type() == at::kInt, "probe_mma: a must be int32 [32, 4]");
  TORCH_CHECK(b.sizes() == at::IntArrayRef({32, 2}) && b.scalar_type() == at::kInt, "probe_mma: b must be int32 [32, 2]");
  TORCH_CHECK(c.sizes() == at::IntArrayRef({32, 4}) && c.scalar_type() == at::kFloat, "probe_mma: c must be float32 [32, 4]");
  const at::Tensor a_c = a.contiguous(), b_c = b.contiguous(), c_c = c.contiguous();
  at::Tensor d = at::empty({32, 4}, c.options());
  HELIX_LAUNCH(1, 32, 0, nullptr, mma_probe_kernel)(reinterpret_cast<const uint32_t*>(a_c.const_data_ptr<int32_t>()),
                                                     reinterpret_cast<const uint32_t*>(b_c.const_data_ptr<int32_t>()),
                                                     c_c.const_data_ptr<float>(), d.mutable_data_ptr<float>(), bf16);
  HELIX_CUDA_LAUNCH_CHECK();
  return d;
}

void ldmatrix_probe_kernel(const uint16_t* rows, uint32_t* fragments, bool transposed) {
  HELIX_DYNAMIC_SHARED(unsigned char, shared);
  const int lane = static_cast<int>(threadIdx.x);
  std::memcpy(shared + 16 * lane, rows + 8 * lane, 16);  // lane i's row: 8 b16 elements
  __syncthreads();
  uint32_t fragment[4];
  const uint32_t address = ptx::shared_address(shared + 16 * lane);
  if (transposed) {
    ptx::ldmatrix_x4_transposed(fragment, address);
  } else {
    ptx::ldmatrix_x4(fragment, address);
  }
  for (int i = 0; i < 4; ++i) fragments[4 * lane + i] = fragment[i];
}

// rows [32, 8] int16 (row i is the one lane i points at) -> fragments [32, 4] int32.
at::Tensor probe_ldmatrix(const at::Tensor& rows, bool transposed) {
  TORCH_CHECK(rows.sizes() == at::IntArrayRef({32, 8}) && rows.scalar_type() == at::kShort,
              "probe_ldmatrix: rows must be int16 [32, 8]");
  const at::Tensor rows_c = rows.contiguous();
  at::Tensor fragments = at::empty({32, 4}, rows.options().dtype(at::kInt));
  HELIX_LAUNCH(1, 32, 512, nullptr, ldmatrix_probe_kernel)(
      reinterpret_cast<const uint16_t*>(rows_c.const_data_ptr<int16_t>()),
      reinterpret_cast<uint32_t*>(fragments.mutable_data_ptr<int32_t>()), transposed);
  HELIX_CUDA_LAUNCH_CHECK();
  return fragments;
}

// Kernels with one deliberate hazard each, for the runtime's own tests (tests/simt/test_runtime.py).
enum HazardProbe {
  kDivergentBarrier = 0,    // half the block returns before a __syncthreads
  kCollectiveDeadlock = 1,  // half a warp shuffles while the other half waits at a barrier
  kReadBeforeWait = 2,      // a cp.async destination read before cp.async.wait_group
  kSharedOutOfBounds = 3,   // a cp.async past the end of the dynamic shared memory
  kUninitializedShared = 4, // shared memory read that nothing wrote
  kRace = 5,                // a neighbour's shared value read without a barrier
  kSignedOverflow = 6,      // int arithmetic past INT32_MAX (UBSan)
};

void hazard_probe_kernel(int kind, const float* source, float* out) {
  HELIX_DYNAMIC_SHARED(float, shared);
  const int tid = static_cast<int>(threadIdx.x);
  switch (kind) {
    case kDivergentBarrier:
      if (tid >= 16) return;
      __syncthreads();
      break;
    case kCollectiveDeadlock:
      if (tid < 16) {
        out[tid] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
      } else {
        __syncthreads();
      }
      break;
    case kReadBeforeWait:
      ptx::cp_async_16(ptx::shared_address(shared + 4 * tid), source + 4 * tid, true);
      ptx::cp_async_commit();
      out[tid] = shared[4 * tid];
      ptx::cp_async_wait<0>();
      break;
    case kSharedOutOfBounds:
      ptx::cp_async_16(ptx::shared_address(shared + 4 * tid + 4), source + 4 * tid, true);
      ptx::cp_async_commit();
      ptx::cp_async_wait<0>();
      break;
    case kUninitializedShared:
      if (tid % 2 == 0) shared[tid] = source[tid];
      __syncthreads();
      out[tid] = shared[tid];
      break;
    case kRace:
      shared[tid] = source[tid];
      out[tid] = shared[(tid + 1) % 32];
      break;
    case kSignedOverflow: {
      const int large = static_cast<int>(source[127]) * 16909320;  // 127 * 16909320 < 2^31
      out[tid] = static_cast<float>(large + tid * 1000000);          // overflows for tid >= 1
      break;
    }
  }
}

// Runs hazard probe `kind` on 32 threads with 512 bytes of shared memory; returns what it wrote.
at::Tensor probe_hazard(int64_t kind) {
  const at::Tensor source = at::arange(128, at::TensorOptions().dtype(at::kFloat));
  at::Tensor out = at::zeros({32}, source.options());
  HELIX_LAUNCH(1, 32, 512, nullptr, hazard_probe_kernel)(static_cast<int>(kind), source.const_data_ptr<float>(),
                                                          out.mutable_data_ptr<float>());
  HELIX_CUDA_LAUNCH_CHECK();
  return out;
}

// flash_decode's split merge as its launcher runs it (fp32 partials in, q's dtype out), for any
// head dim: the launcher only ever takes the 16-byte path (Dv is a multiple of 4), this reaches
// the scalar instance too. parts_out [P, B, H, D] fp32, parts_lse [P, B, H] -> out, lse.
std::tuple<at::Tensor, at::Tensor> probe_split_merge(const at::Tensor& parts_out, const at::Tensor& parts_lse,
                                                     at::ScalarType out_dtype) {
  check_merge_states_args(parts_out, parts_lse);
  TORCH_CHECK(parts_out.scalar_type() == at::kFloat, "probe_split_merge: parts_out must be float32");
  TORCH_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kHalf, "probe_split_merge: out_dtype is bf16 or fp16");
  EmulatedCall call("probe_split_merge", parts_out);
  at::Tensor out = at::empty({parts_out.size(1), parts_out.size(2), parts_out.size(3)},
                             parts_out.options().dtype(out_dtype));
  at::Tensor lse = at::empty({parts_out.size(1), parts_out.size(2)}, parts_out.options());
  launch_split_merge(parts_out, parts_lse, out, lse, call.context());
  return {out, lse};
}

// The flash_decode kernel's fp8 widening (cvt.rn.f16x2.e4m3x2, PTX ISA 9.7.9.21; on the host the
// toolkit's cuda_fp8.hpp computes it) on every 16-bit pair: pairs [N] int32 -> [N] int32 words.
at::Tensor probe_widen_fp8(const at::Tensor& pairs, bool bf16) {
  TORCH_CHECK(pairs.dim() == 1 && pairs.scalar_type() == at::kInt, "probe_widen_fp8: pairs must be 1-D int32");
  const at::Tensor input = pairs.contiguous();
  at::Tensor words = at::empty_like(input);
  const int32_t* in = input.const_data_ptr<int32_t>();
  int32_t* out = words.mutable_data_ptr<int32_t>();
  for (int64_t i = 0; i < input.numel(); ++i) {
    const auto pair = static_cast<uint16_t>(in[i] & 0xFFFF);
    const uint32_t word = bf16 ? detail::widen_fp8_pair<__nv_bfloat16>(pair) : detail::widen_fp8_pair<__half>(pair);
    out[i] = static_cast<int32_t>(word);
  }
  return words;
}

pybind11::dict get_settings() {
  const Settings& s = settings();
  pybind11::dict out;
  out["schedule"] = static_cast<int>(s.schedule);
  out["seed"] = s.seed;
  out["poison"] = static_cast<int>(s.poison);
  out["multiprocessor_count"] = s.multiprocessor_count;
  out["planted_defect"] = s.planted_defect;
  return out;
}

void set_settings(int schedule, uint64_t seed, int poison, int multiprocessor_count, int planted_defect) {
  if (schedule < 0 || schedule > 3) throw std::invalid_argument("schedule must be 0..3");
  if (poison < 0 || poison > 255) throw std::invalid_argument("poison must be a byte");
  if (multiprocessor_count < 1) throw std::invalid_argument("multiprocessor_count must be >= 1");
  Settings& s = settings();
  s.schedule = static_cast<Schedule>(schedule);
  s.seed = seed;
  s.poison = static_cast<uint8_t>(poison);
  s.multiprocessor_count = multiprocessor_count;
  s.planted_defect = planted_defect;
}

}  // namespace
}  // namespace simt
}  // namespace helix

TORCH_LIBRARY(helix_simt, m) {
  helix::define_op_schemas(m);
  m.def("probe_mma(Tensor a, Tensor b, Tensor c, bool bf16) -> Tensor");
  m.def("probe_ldmatrix(Tensor rows, bool transposed) -> Tensor");
  m.def("probe_hazard(int kind) -> Tensor", &helix::simt::probe_hazard);
  m.def("probe_widen_fp8(Tensor pairs, bool bf16) -> Tensor");
  m.def("probe_split_merge(Tensor parts_out, Tensor parts_lse, ScalarType out_dtype) -> (Tensor, Tensor)");  // no tensor argument: a catch-all kernel
}

TORCH_LIBRARY_IMPL(helix_simt, CPU, m) {
  m.impl("merge_states", &helix::simt::merge_states_simt);
  m.impl("flash_decode", &helix::simt::flash_decode_simt);
  m.impl("quantize_fp4", &helix::simt::quantize_fp4_simt);
  m.impl("dequantize_fp4", &helix::simt::dequantize_fp4_simt);
  m.impl("fp4_grouped_gemm", &helix::simt::fp4_grouped_gemm_simt);
  m.impl("hopb_signal", &helix::simt::hopb_signal_simt);
  m.impl("hopb_combine", &helix::simt::hopb_combine_simt);
  m.impl("hopb_all_reduce", &helix::simt::hopb_all_reduce_simt);
  m.impl("probe_mma", &helix::simt::probe_mma);
  m.impl("probe_ldmatrix", &helix::simt::probe_ldmatrix);
  m.impl("probe_widen_fp8", &helix::simt::probe_widen_fp8);
  m.impl("probe_split_merge", &helix::simt::probe_split_merge);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "helix-ext's SIMT host runtime: torch.ops.helix_simt.* run the CUDA kernels' source on CPU tensors.";
  m.def("get_settings", &helix::simt::get_settings, "The emulation settings of this OS thread.");
  m.def("set_settings", &helix::simt::set_settings, pybind11::arg("schedule"), pybind11::arg("seed"),
        pybind11::arg("poison"), pybind11::arg("multiprocessor_count"), pybind11::arg("planted_defect"),
        "Schedule (0 in order, 1 reversed, 2 round robin, 3 shuffle), seed, poison byte, SM count, planted defect.");
  m.def("reset_publications", &helix::simt::reset_publications,
        "Forget the recorded system-scope flag stores (call between tests that reuse memory).");
  pybind11::dict defects;
  defects["missing_barrier"] = static_cast<int>(helix::kPlantMissingBarrier);
  defects["wait_group_off_by_one"] = static_cast<int>(helix::kPlantWaitGroupOffByOne);
  defects["swapped_fragment"] = static_cast<int>(helix::kPlantSwappedFragment);
  defects["tile_bound_off_by_one"] = static_cast<int>(helix::kPlantTileBoundOffByOne);
  defects["loop_bound_off_by_one"] = static_cast<int>(helix::kPlantLoopBoundOffByOne);
  defects["missing_release_fence"] = static_cast<int>(helix::kPlantMissingReleaseFence);
  defects["missing_exchange_barrier"] = static_cast<int>(helix::kPlantMissingExchangeBarrier);
  m.attr("planted_defects") = defects;
#if defined(HELIX_PLANTED_DEFECTS)
  m.attr("planted_defects_built") = true;
#else
  m.attr("planted_defects_built") = false;
#endif
#if defined(__SANITIZE_ADDRESS__)
  m.attr("sanitized") = true;
#else
  m.attr("sanitized") = false;
#endif
}
