// Argument checks for the FP4 ops (quantize_fp4, dequantize_fp4, fp4_grouped_gemm), shared
// by their CPU and CUDA launchers, plus the value checks of offs and global scales (always
// on CPU; on CUDA only with HELIX_CHECK_INPUTS=1, as they cost a device sync).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string_view>

#include "helix/fp4.h"

namespace helix {

struct Fp4Format {
  bool nvfp4;
  int block;                    // elements per scale: 16 (NVFP4) or 32 (MXFP4)
  at::ScalarType scale_dtype;   // float8_e4m3fn (NVFP4) or uint8 E8M0 (MXFP4)
  const char* name;
};

inline Fp4Format parse_fp4_format(std::string_view op, std::string_view fmt) {
  if (fmt == "nvfp4") return {true, kNvfp4Block, at::kFloat8_e4m3fn, "nvfp4"};
  if (fmt == "mxfp4") return {false, kMxfp4Block, at::kByte, "mxfp4"};
  TORCH_CHECK(false, op, ": fmt must be \"nvfp4\" or \"mxfp4\", got \"", fmt, "\"");
}

inline void check_k_multiple(std::string_view op, const char* name, int64_t k, const Fp4Format& format) {
  TORCH_CHECK(k % format.block == 0, op, ": ", name, "'s K (", k, ") must be a multiple of the ", format.name,
              " block (", format.block, ")");
}

inline void check_scale_scalar(std::string_view op, const char* name, const at::Tensor& scale,
                               const at::Tensor& like) {
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == 1, op, ": ", name,
              " must be a float32 tensor with one element, got ", scale.scalar_type(), " with shape ", scale.sizes());
  TORCH_CHECK(scale.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", scale.device());
}

// Every global scale must be a finite positive multiplier.
inline void check_global_scale_values(std::string_view op, const char* name, const at::Tensor& scale) {
  const at::Tensor values = scale.detach().to(at::kCPU, at::kFloat).contiguous();
  const float* data = values.const_data_ptr<float>();
  for (int64_t i = 0; i < values.numel(); ++i) {
    TORCH_CHECK(std::isfinite(data[i]) && data[i] > 0.0f, op, ": ", name, values.numel() > 1 ? "[" : "",
                values.numel() > 1 ? std::to_string(i) : std::string(), values.numel() > 1 ? "]" : "", " = ", data[i],
                " must be finite and positive (it is a decode multiplier)");
  }
}

inline Fp4Format check_quantize_fp4_args(const at::Tensor& x, std::string_view fmt,
                                         const std::optional<at::Tensor>& global_scale) {
  const Fp4Format format = parse_fp4_format("quantize_fp4", fmt);
  TORCH_CHECK(x.dim() == 2, "quantize_fp4: x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf || x.scalar_type() == at::kFloat,
              "quantize_fp4: x must be bfloat16, float16 or float32, got ", x.scalar_type());
  check_k_multiple("quantize_fp4", "x", x.size(1), format);
  if (global_scale.has_value()) {
    TORCH_CHECK(format.nvfp4, "quantize_fp4: global_scale applies to nvfp4 only (mxfp4 has none)");
    check_scale_scalar("quantize_fp4", "global_scale", *global_scale, x);
  }
  return format;
}

inline Fp4Format check_dequantize_fp4_args(const at::Tensor& packed, const at::Tensor& block_scales,
                                           const at::Tensor& global_scale, std::string_view fmt,
                                           at::ScalarType dtype) {
  const Fp4Format format = parse_fp4_format("dequantize_fp4", fmt);
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte,
              "dequantize_fp4: packed must be a 2-D uint8 tensor [M, K/2], got ", packed.scalar_type(), " with shape ",
              packed.sizes());
  const int64_t k = packed.size(1) * 2;
  check_k_multiple("dequantize_fp4", "packed", k, format);
  TORCH_CHECK(block_scales.scalar_type() == format.scale_dtype, "dequantize_fp4: block_scales must be ",
              format.scale_dtype, " for ", format.name, ", got ", block_scales.scalar_type());
  TORCH_CHECK(block_scales.dim() == 2 && block_scales.size(0) == packed.size(0) &&
                  block_scales.size(1) == k / format.block,
              "dequantize_fp4: block_scales must be [M, K/", format.block, "] = [", packed.size(0), ", ",
              k / format.block, "], got ", block_scales.sizes());
  TORCH_CHECK(block_scales.device() == packed.device(), "dequantize_fp4: block_scales must be on ", packed.device());
  check_scale_scalar("dequantize_fp4", "global_scale", global_scale, packed);
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat,
              "dequantize_fp4: dtype must be bfloat16, float16 or float32, got ", dtype);
  return format;
}

struct GroupedGemmShape {
  int64_t tokens, k, num_experts, n;
};

inline GroupedGemmShape check_fp4_grouped_gemm_args(const at::Tensor& x, const at::Tensor& w,
                                                    const at::Tensor& w_scales, const at::Tensor& w_global_scale,
                                                    const at::Tensor& offs, const Fp4Format& format) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16,
              "fp4_grouped_gemm: x must be a 2-D bfloat16 tensor [T, K], got ", x.scalar_type(), " with shape ",
              x.sizes());
  GroupedGemmShape shape{x.size(0), x.size(1), 0, 0};
  check_k_multiple("fp4_grouped_gemm", "x", shape.k, format);
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kByte,
              "fp4_grouped_gemm: w must be a 3-D uint8 tensor [E, N, K/2], got ", w.scalar_type(), " with shape ",
              w.sizes());
  shape.num_experts = w.size(0);
  shape.n = w.size(1);
  TORCH_CHECK(shape.num_experts >= 1, "fp4_grouped_gemm: w must hold at least one expert (E >= 1)");
  TORCH_CHECK(w.size(2) * 2 == shape.k, "fp4_grouped_gemm: w's last dim (", w.size(2), ") must be K/2 = ",
              shape.k / 2, " for x's K = ", shape.k);
  TORCH_CHECK(w_scales.scalar_type() == format.scale_dtype, "fp4_grouped_gemm: w_scales must be ",
              format.scale_dtype, " for ", format.name, ", got ", w_scales.scalar_type());
  TORCH_CHECK(w_scales.dim() == 3 && w_scales.size(0) == shape.num_experts && w_scales.size(1) == shape.n &&
                  w_scales.size(2) == shape.k / format.block,
              "fp4_grouped_gemm: w_scales must be [E, N, K/", format.block, "] = [", shape.num_experts, ", ", shape.n,
              ", ", shape.k / format.block, "], got ", w_scales.sizes());
  TORCH_CHECK(w_global_scale.scalar_type() == at::kFloat && w_global_scale.dim() == 1 &&
                  w_global_scale.size(0) == shape.num_experts,
              "fp4_grouped_gemm: w_global_scale must be a float32 tensor [E] = [", shape.num_experts, "], got ",
              w_global_scale.scalar_type(), " with shape ", w_global_scale.sizes());
  TORCH_CHECK(offs.dim() == 1 && offs.scalar_type() == at::kInt && offs.size(0) == shape.num_experts,
              "fp4_grouped_gemm: offs must be an int32 tensor [E] = [", shape.num_experts,
              "] of cumulative group end offsets, got ", offs.scalar_type(), " with shape ", offs.sizes());
  for (const auto& [tensor, name] : {std::pair<const at::Tensor&, const char*>{w, "w"}, {w_scales, "w_scales"},
                                     {w_global_scale, "w_global_scale"}, {offs, "offs"}}) {
    TORCH_CHECK(tensor.device() == x.device(), "fp4_grouped_gemm: ", name, " must be on ", x.device(),
                " (x's device), got ", tensor.device());
  }
  return shape;
}

// offs must be non-decreasing, start at >= 0 and end at <= T.
inline void check_offs_values(const at::Tensor& offs, int64_t tokens) {
  const at::Tensor values = offs.to(at::kCPU).contiguous();
  const int32_t* data = values.const_data_ptr<int32_t>();
  int64_t previous = 0;
  for (int64_t e = 0; e < values.numel(); ++e) {
    TORCH_CHECK(data[e] >= previous, "fp4_grouped_gemm: offs must be non-decreasing cumulative end offsets, but offs[",
                e, "] = ", data[e], " < ", previous, e > 0 ? " (offs[" + std::to_string(e - 1) + "])" : std::string());
    TORCH_CHECK(data[e] <= tokens, "fp4_grouped_gemm: offs[", e, "] = ", data[e], " exceeds T = ", tokens,
                " (x's rows)");
    previous = data[e];
  }
}

}  // namespace helix
