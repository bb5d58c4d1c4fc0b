// FP4 ops on the CPU: NVFP4/MXFP4 quantize and dequantize with the codec of helix/fp4.h
// (the CUDA kernels' own, so both produce identical bits), and the grouped GEMM
// y[rows of e] = x[rows of e] @ dequant(w[e]).T * global[e], fp32 accumulation.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "fp4_args.h"
#include "helix/fp4.h"
#include "simd.h"

namespace helix {
namespace {

template <typename T>
float amax_of(const at::Tensor& x) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const T* data = x.const_data_ptr<T>();
  std::vector<float> partial(std::max<int64_t>(1, at::get_num_threads()), 0.0f);
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    float local = 0.0f;
    for (int64_t r = begin; r < end; ++r) {
      const T* row = data + r * x.stride(0);
      for (int64_t c = 0; c < cols; ++c) {
        local = max_magnitude(local, tensor_amax_magnitude(static_cast<float>(row[c * x.stride(1)])));
      }
    }
    float& slot = partial[at::get_thread_num()];
    slot = max_magnitude(slot, local);
  });
  float amax = 0.0f;
  for (float value : partial) amax = max_magnitude(amax, value);
  return amax;
}

template <typename T, int BLOCK>
void quantize_rows(const at::Tensor& x, bool nvfp4, float global_scale, uint8_t* packed, uint8_t* scales) {
  const int64_t rows = x.size(0), cols = x.size(1), blocks = cols / BLOCK;
  const T* data = x.const_data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    float values[BLOCK];
    uint8_t bytes[BLOCK / 2];
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < blocks; ++b) {
        for (int i = 0; i < BLOCK; ++i) values[i] = static_cast<float>(data[r * x.stride(0) + (b * BLOCK + i) * x.stride(1)]);
        scales[r * blocks + b] = quantize_fp4_block<BLOCK>(values, nvfp4, global_scale, bytes);
        std::copy(bytes, bytes + BLOCK / 2, packed + r * (cols / 2) + b * (BLOCK / 2));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_fp4_cpu(const at::Tensor& x, c10::string_view fmt,
                                                                const std::optional<at::Tensor>& global_scale) {
  const Fp4Format format = check_quantize_fp4_args(x, fmt, global_scale);
  TORCH_CHECK(x.device().is_cpu(), "quantize_fp4: x must be a CPU tensor here, got ", x.device());
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor packed = at::empty({rows, cols / 2}, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty({rows, cols / format.block}, x.options().dtype(format.scale_dtype));
  at::Tensor global = at::empty({}, x.options().dtype(at::kFloat));
  float global_value = 1.0f;
  if (global_scale.has_value()) {
    check_global_scale_values("quantize_fp4", "global_scale", *global_scale);
    global_value = global_scale->item<float>();
  } else if (format.nvfp4) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_fp4_amax",
                                    [&] { global_value = nvfp4_global_scale(amax_of<scalar_t>(x)); });
  }
  global.fill_(global_value);
  uint8_t* packed_data = packed.mutable_data_ptr<uint8_t>();
  uint8_t* scale_data = static_cast<uint8_t*>(scales.mutable_data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_fp4", [&] {
    if (format.nvfp4) {
      quantize_rows<scalar_t, kNvfp4Block>(x, true, global_value, packed_data, scale_data);
    } else {
      quantize_rows<scalar_t, kMxfp4Block>(x, false, 1.0f, packed_data, scale_data);
    }
  });
  return {packed, scales, global};
}

template <typename T>
T canonical_nan() {
  if constexpr (std::is_same_v<T, float>) {
    return float_from_bits(kQuietNanBitsF32);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return c10::Half(kQuietNanBitsF16, c10::Half::from_bits());
  } else {
    return c10::BFloat16(kQuietNanBitsBf16, c10::BFloat16::from_bits());
  }
}

// Multiplier of block `b` of a row whose scale codes start at `scale_row`.
inline float block_multiplier(const uint8_t* scale_row, int64_t b, bool nvfp4, float global_scale) {
  return nvfp4 ? nvfp4_block_multiplier(scale_row[b], global_scale) : mxfp4_scale_value(scale_row[b]);
}

at::Tensor dequantize_fp4_cpu(const at::Tensor& packed, const at::Tensor& block_scales, const at::Tensor& global_scale,
                              c10::string_view fmt, at::ScalarType dtype) {
  const Fp4Format format = check_dequantize_fp4_args(packed, block_scales, global_scale, fmt, dtype);
  TORCH_CHECK(packed.device().is_cpu(), "dequantize_fp4: packed must be a CPU tensor here, got ", packed.device());
  const at::Tensor bytes = packed.contiguous(), scales = block_scales.contiguous();
  const int64_t rows = bytes.size(0), cols = bytes.size(1) * 2, blocks = cols / format.block;
  check_global_scale_values("dequantize_fp4", "global_scale", global_scale);
  const float global_value = global_scale.item<float>();
  at::Tensor out = at::empty({rows, cols}, packed.options().dtype(dtype));
  const uint8_t* byte_data = bytes.const_data_ptr<uint8_t>();
  const uint8_t* scale_data = static_cast<const uint8_t*>(scales.const_data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequantize_fp4", [&] {
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t b = 0; b < blocks; ++b) {
          const float multiplier = block_multiplier(scale_data + r * blocks, b, format.nvfp4, global_value);
          for (int64_t i = b * format.block; i < (b + 1) * format.block; ++i) {
            const uint8_t byte = byte_data[r * (cols / 2) + i / 2];
            const float value = dequantize_fp4_element(byte, static_cast<int>(i % 2), multiplier);
            // NaN as the canonical pattern of the dtype (kQuietNanBits*), as on CUDA.
            out_data[r * cols + i] = value == value ? static_cast<scalar_t>(value) : canonical_nan<scalar_t>();
          }
        }
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// The grouped GEMM on bf16 tensor tiles (oneDNN's AMX micro-kernel through
// at::native::cpublas::brgemm), where the CPU has them and no operand is a bf16 subnormal
// (which AMX reads as zero). Then it computes what the fp32 path computes: a code's
// value times its block multiplier (global scale left out, as there) has at most 6 significant
// bits (E2M1 x E4M3) or is a power-of-two multiple (E8M0), so it is a bf16; bf16 x bf16
// products are exact in the fp32 accumulator (only the order of the sums differs). Per expert
// and tile of kWeightRows weight rows:
// the rows dequantized into bf16 (vector arithmetic, dequantize_row_pairs), then
//   C^T[n, t] = W_tile[n, K] x x_e^T[K, t]
// against the expert's activations packed once (VNNI: [K/2][tokens][2]), scaled by the global
// scale and rounded to bf16.
constexpr int64_t kWeightRows = 32;
constexpr int64_t kTokenSlab = 64;  // tokens per brgemm (a packed B is at most 64 wide)

// bf16 bits of an E2M1 code (the value e2m1_to_float gives): 0, 0.5, then 1.0-6.0 as
// exponent/mantissa fields shifted into place. U is uint32_t or a vector of them (simd.h).
template <typename U>
HELIX_VECTOR_INLINE U e2m1_bf16_bits(U code) {
  const U magnitude = code & 7u;
  const U bits = magnitude < 2u ? magnitude * 0x3F00u : (magnitude << 6) + 0x3F00u;
  return bits | ((code & 8u) << 12);
}

// A byte of two codes as a bf16 pair (low nibble in the low half): code x multiplier in fp32,
// whose top 16 bits are the exact bf16 (NaN and inf included). U/F: uint32_t/float, or vectors
// of them, one byte per lane.
template <typename U, typename F>
HELIX_VECTOR_INLINE U e2m1_bf16_pair(U byte, float multiplier) {
  const U low_code = e2m1_bf16_bits<U>(byte & 0xFu) << 16, high_code = e2m1_bf16_bits<U>(byte >> 4) << 16;
  F low, high;
  std::memcpy(&low, &low_code, sizeof(low));
  std::memcpy(&high, &high_code, sizeof(high));
  low *= multiplier;
  high *= multiplier;
  U low_bits, high_bits;
  std::memcpy(&low_bits, &low, sizeof(low_bits));
  std::memcpy(&high_bits, &high, sizeof(high_bits));
  return (low_bits >> 16) | (high_bits & 0xFFFF0000u);
}

// One weight row as bf16 pairs. PAIRS: bytes per block (8 NVFP4, 16 MXFP4).
template <int PAIRS>
HELIX_CPU_CLONES void dequantize_row_pairs(const uint8_t* __restrict w_row, const float* __restrict multipliers,
                                          int64_t blocks, uint32_t* __restrict out) {
  static_assert(PAIRS == 8 || PAIRS == 16, "blocks are 16 or 32 codes");
  for (int64_t b = 0; b < blocks; ++b) {
    const float multiplier = multipliers[b];
    if constexpr (PAIRS == 8) {
      // NVFP4: GCC vectorizes this scalar loop well (CF1 6.3-6.6 ms; the 8-lane code below
      // measured 8.6-9.7 ms on these 8-byte blocks).
      for (int j = 0; j < PAIRS; ++j) {
        out[b * PAIRS + j] = e2m1_bf16_pair<uint32_t, float>(w_row[b * PAIRS + j], multiplier);
      }
    } else {
      // MXFP4: the scalar loop came out in 2-wide pieces (CF1 20 ms); on 8-lane vectors
      // (simd.h's vector extension) 7.6-8.5 ms (2026-12-07).
      for (int half = 0; half < PAIRS / 8; ++half) {
        U8x8 raw;
        std::memcpy(&raw, w_row + b * PAIRS + half * 8, sizeof(raw));
        const U32x8 pairs = e2m1_bf16_pair<U32x8, F32x8>(__builtin_convertvector(raw, U32x8), multiplier);
        std::memcpy(out + b * PAIRS + half * 8, &pairs, sizeof(pairs));
      }
    }
  }
}

// AMX reads bf16 subnormals as zero: the bf16 path runs only when no operand is one. Weights
// are subnormal only under MXFP4 scale codes 0 and 1 (0.5 x 2^-127, 0.5 x 2^-126; an NVFP4
// block multiplier without the global scale is at least 2^-9); the activations (x, contiguous)
// are scanned.
bool bf16_grouped_gemm_exact(const at::Tensor& activations, const uint8_t* scale_data, int64_t num_scales,
                             const Fp4Format& format) {
  if (!format.nvfp4) {
    for (int64_t i = 0; i < num_scales; ++i) {
      if (scale_data[i] < 2) return false;
    }
  }
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(activations.const_data_ptr<c10::BFloat16>());
  bool subnormal = false;
  for (int64_t i = 0; i < activations.numel(); ++i) subnormal |= (bits[i] & 0x7F80u) == 0 && (bits[i] & 0x7Fu) != 0;
  return !subnormal;
}

// activations: x, contiguous.
void fp4_grouped_gemm_bf16(const at::Tensor& activations, const uint8_t* w_data, const uint8_t* scale_data,
                           const float* global_data, const int32_t* end_data, const GroupedGemmShape& shape,
                           const Fp4Format& format, at::Tensor& y) {
  const int64_t k = shape.k, blocks = k / format.block;
  const uint32_t* x_pairs = reinterpret_cast<const uint32_t*>(activations.const_data_ptr<c10::BFloat16>());
  c10::BFloat16* y_data = y.mutable_data_ptr<c10::BFloat16>();

  // Each expert's activations as VNNI B operands, slab by slab of kTokenSlab tokens (each
  // slab's width padded to a multiple of 16 with zero columns).
  struct Slab {
    int64_t expert, token_begin, tokens, width, offset;  // offset into packed (uint32 pairs)
  };
  std::vector<Slab> slabs;
  std::vector<int64_t> first_slab(shape.num_experts + 1, 0);
  int64_t packed_pairs = 0;
  for (int64_t e = 0; e < shape.num_experts; ++e) {
    first_slab[e] = static_cast<int64_t>(slabs.size());
    const int64_t row_begin = e == 0 ? 0 : end_data[e - 1], row_end = end_data[e];
    for (int64_t t = row_begin; t < row_end; t += kTokenSlab) {
      const int64_t tokens = std::min(kTokenSlab, row_end - t), width = (tokens + 15) / 16 * 16;
      slabs.push_back({e, t, tokens, width, packed_pairs});
      packed_pairs += k / 2 * width;
    }
  }
  first_slab[shape.num_experts] = static_cast<int64_t>(slabs.size());
  std::vector<uint32_t> packed(packed_pairs);
  at::parallel_for(0, static_cast<int64_t>(slabs.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Slab& slab = slabs[i];
      uint32_t* out = packed.data() + slab.offset;
      for (int64_t pair = 0; pair < k / 2; ++pair) {
        uint32_t* row = out + pair * slab.width;
        for (int64_t t = 0; t < slab.tokens; ++t) row[t] = x_pairs[(slab.token_begin + t) * (k / 2) + pair];
        std::fill(row + slab.tokens, row + slab.width, 0u);
      }
    }
  });

  // Work: (expert with tokens, tile of weight rows).
  const int64_t tiles_per_expert = (shape.n + kWeightRows - 1) / kWeightRows;
  std::vector<int64_t> work;
  for (int64_t e = 0; e < shape.num_experts; ++e) {
    if (first_slab[e] == first_slab[e + 1]) continue;
    for (int64_t tile = 0; tile < tiles_per_expert; ++tile) work.push_back(e * tiles_per_expert + tile);
  }
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> weights(kWeightRows * (k / 2));
    std::vector<float> multipliers(blocks);
    std::vector<float> products(kWeightRows * kTokenSlab);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e = work[i] / tiles_per_expert, n0 = (work[i] % tiles_per_expert) * kWeightRows;
      const int64_t rows = std::min(kWeightRows, shape.n - n0);
      for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* w_row = w_data + (e * shape.n + n0 + r) * (k / 2);
        const uint8_t* scale_row = scale_data + (e * shape.n + n0 + r) * blocks;
        for (int64_t b = 0; b < blocks; ++b) multipliers[b] = block_multiplier(scale_row, b, format.nvfp4, 1.0f);
        uint32_t* out = weights.data() + r * (k / 2);
        if (format.nvfp4) {
          dequantize_row_pairs<kNvfp4Block / 2>(w_row, multipliers.data(), blocks, out);
        } else {
          dequantize_row_pairs<kMxfp4Block / 2>(w_row, multipliers.data(), blocks, out);
        }
      }
      const float global = global_data[e];
      for (int64_t index = first_slab[e]; index < first_slab[e + 1]; ++index) {
        const Slab& slab = slabs[index];
        at::native::cpublas::brgemm(rows, slab.width, k, k, slab.width, slab.width, false,
                                    reinterpret_cast<const c10::BFloat16*>(weights.data()),
                                    reinterpret_cast<const c10::BFloat16*>(packed.data() + slab.offset),
                                    products.data(), true);
        for (int64_t t = 0; t < slab.tokens; ++t) {
          c10::BFloat16* y_row = y_data + (slab.token_begin + t) * shape.n + n0;
          for (int64_t r = 0; r < rows; ++r) y_row[r] = static_cast<c10::BFloat16>(products[r * slab.width + t] * global);
        }
      }
    }
    at::native::cpublas::brgemm_release();
  });
}

at::Tensor fp4_grouped_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scales,
                                const at::Tensor& w_global_scale, const at::Tensor& offs, c10::string_view fmt) {
  const Fp4Format format = parse_fp4_format("fp4_grouped_gemm", fmt);
  const GroupedGemmShape shape = check_fp4_grouped_gemm_args(x, w, w_scales, w_global_scale, offs, format);
  TORCH_CHECK(x.device().is_cpu(), "fp4_grouped_gemm: x must be a CPU tensor here, got ", x.device());
  check_offs_values(offs, shape.tokens);
  check_global_scale_values("fp4_grouped_gemm", "w_global_scale", w_global_scale);
  at::Tensor y = at::zeros({shape.tokens, shape.n}, x.options());  // rows past offs[-1] stay zero
  if (shape.tokens == 0 || shape.n == 0) return y;
  const at::Tensor weights = w.contiguous(), scales = w_scales.contiguous();
  const at::Tensor globals = w_global_scale.contiguous(), ends = offs.contiguous();
  const uint8_t* w_data = weights.const_data_ptr<uint8_t>();
  const uint8_t* scale_data = static_cast<const uint8_t*>(scales.const_data_ptr());
  const float* global_data = globals.const_data_ptr<float>();
  const int32_t* end_data = ends.const_data_ptr<int32_t>();
  if (shape.k > 0 && at::native::cpublas::could_pack(at::kBFloat16)) {
    const at::Tensor activations = x.contiguous();
    if (bf16_grouped_gemm_exact(activations, scale_data, scales.numel(), format)) {
      fp4_grouped_gemm_bf16(activations, w_data, scale_data, global_data, end_data, shape, format, y);
      return y;
    }
  }
  const at::Tensor activations = x.to(at::kFloat);
  const int64_t k = shape.k, blocks = k / format.block;
  float codes[16];
  for (uint32_t c = 0; c < 16; ++c) codes[c] = e2m1_to_float(c);
  // Per expert with tokens: its weights dequantized once into fp32 (a code's value times its
  // block multiplier: the very products dequantize_fp4 makes), then one fp32 GEMM over the
  // expert's rows, times the global scale, rounded to bf16.
  at::Tensor expert_weights = at::empty({shape.n, k}, x.options().dtype(at::kFloat));
  float* dequantized = expert_weights.mutable_data_ptr<float>();
  for (int64_t e = 0; e < shape.num_experts; ++e) {
    const int64_t row_begin = e == 0 ? 0 : end_data[e - 1], row_end = end_data[e];
    if (row_begin == row_end) continue;
    at::parallel_for(0, shape.n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const uint8_t* w_row = w_data + (e * shape.n + n) * (k / 2);
        const uint8_t* scale_row = scale_data + (e * shape.n + n) * blocks;
        float* out_row = dequantized + n * k;
        for (int64_t b = 0; b < blocks; ++b) {
          const float multiplier = block_multiplier(scale_row, b, format.nvfp4, 1.0f);
          for (int64_t i = b * format.block; i < (b + 1) * format.block; i += 2) {
            const uint8_t byte = w_row[i / 2];
            out_row[i] = codes[byte & 0xFu] * multiplier;
            out_row[i + 1] = codes[byte >> 4] * multiplier;
          }
        }
      }
    });
    at::Tensor rows = at::mm(activations.slice(0, row_begin, row_end), expert_weights.t());
    y.slice(0, row_begin, row_end).copy_(rows.mul_(global_data[e]));
  }
  return y;
}

}  // namespace
}  // namespace helix

TORCH_LIBRARY_IMPL(helix, CPU, m) {
  m.impl("quantize_fp4", &helix::quantize_fp4_cpu);
  m.impl("dequantize_fp4", &helix::dequantize_fp4_cpu);
  m.impl("fp4_grouped_gemm", &helix::fp4_grouped_gemm_cpu);
}
