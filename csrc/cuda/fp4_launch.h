// quantize_fp4 / dequantize_fp4 launcher bodies, device-agnostic: the torch-free kernels of
// helix/fp4_quantize_kernel.cuh (NVFP4's amax is reduced on the device into a small buffer, so
// there is no host sync). Shared by the CUDA ops (fp4.cu) and the SIMT host runtime's
// (csrc/simt/ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "cuda/launch_context.h"
#include "fp4_args.h"
#include "helix/fp4_quantize_kernel.cuh"

namespace helix {
namespace fp4_launch {

inline int grid_for(int64_t work, int multiprocessor_count) {
  const int64_t blocks = (work + kFp4Threads - 1) / kFp4Threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{multiprocessor_count} * 32)));
}

template <typename T, int BLOCK>
void launch_quantize(const Fp4QuantizeParams& params, bool vector, const LaunchContext& context) {
  const int grid = grid_for(params.rows * (params.cols / BLOCK), context.multiprocessor_count);
  const cudaStream_t stream = context.stream;
  if (vector) {
    HELIX_LAUNCH(grid, kFp4Threads, 0, stream, quantize_kernel<T, BLOCK, true>)(params);
  } else {
    HELIX_LAUNCH(grid, kFp4Threads, 0, stream, quantize_kernel<T, BLOCK, false>)(params);
  }
  HELIX_CUDA_LAUNCH_CHECK();
}

template <typename T>
void run_quantize(const at::Tensor& x, Fp4QuantizeParams& params, bool need_amax, const Fp4Format& format,
                  const at::Tensor& amax, const LaunchContext& context) {
  const int sms = context.multiprocessor_count;
  const cudaStream_t stream = context.stream;
  // 16-byte loads need every block's start aligned: the base pointer and the row stride (K
  // is a multiple of the block, so each row holds whole 16-byte vectors).
  const bool vector = is_aligned(x.data_ptr(), 16) && (params.x_stride_row * int64_t{x.element_size()}) % 16 == 0;
  if (need_amax) {
    constexpr int kVec = 16 / sizeof(T);
    const auto* source = static_cast<const T*>(params.x);
    uint32_t* amax_bits = reinterpret_cast<uint32_t*>(amax.mutable_data_ptr<int32_t>());
    if (vector) {
      HELIX_LAUNCH(grid_for(params.rows * params.cols / kVec, sms), kFp4Threads, 0, stream, amax_kernel<T, kVec>)(
          source, params.rows, params.cols, params.x_stride_row, amax_bits);
    } else {
      HELIX_LAUNCH(grid_for(params.rows * params.cols, sms), kFp4Threads, 0, stream, amax_kernel<T, 1>)(
          source, params.rows, params.cols, params.x_stride_row, amax_bits);
    }
    HELIX_CUDA_LAUNCH_CHECK();
  }
  if (format.nvfp4) {
    launch_quantize<T, kNvfp4Block>(params, vector, context);
  } else {
    launch_quantize<T, kMxfp4Block>(params, vector, context);
  }
}

// After the device-independent checks (check_quantize_fp4_args).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize(const at::Tensor& x_in, const Fp4Format& format,
                                                               const std::optional<at::Tensor>& global_scale,
                                                               const LaunchContext& context) {
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();  // rows may be strided, columns not
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor packed = at::empty({rows, cols / 2}, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty({rows, cols / format.block}, x.options().dtype(format.scale_dtype));
  at::Tensor global = at::empty({}, x.options().dtype(at::kFloat));
  const bool need_amax = format.nvfp4 && !global_scale.has_value();
  at::Tensor amax = need_amax ? at::zeros({1}, x.options().dtype(at::kInt)) : at::Tensor();

  Fp4QuantizeParams params{};
  params.x = x.const_data_ptr();
  params.rows = rows;
  params.cols = cols;
  params.x_stride_row = x.stride(0);
  params.packed = packed.mutable_data_ptr<uint8_t>();
  params.scales = static_cast<uint8_t*>(scales.mutable_data_ptr());
  params.global_scale_out = global.mutable_data_ptr<float>();
  params.global_scale_in = global_scale.has_value() ? global_scale->const_data_ptr<float>() : nullptr;
  params.amax_bits = need_amax ? reinterpret_cast<const uint32_t*>(amax.const_data_ptr<int32_t>()) : nullptr;
  params.nvfp4 = format.nvfp4;
  if (rows * cols == 0) {
    // Nothing to quantize: the global scale is still defined (the given one, or 1.0).
    global.copy_(global_scale.has_value() ? global_scale->reshape({}) : at::ones({}, global.options()));
    return {packed, scales, global};
  }
  switch (x.scalar_type()) {
    case at::kFloat: run_quantize<float>(x, params, need_amax, format, amax, context); break;
    case at::kHalf: run_quantize<__half>(x, params, need_amax, format, amax, context); break;
    default: run_quantize<__nv_bfloat16>(x, params, need_amax, format, amax, context); break;
  }
  return {packed, scales, global};
}

template <typename T>
void run_dequantize(const Fp4DequantizeParams& params, const Fp4Format& format, const LaunchContext& context) {
  const int grid = grid_for(params.rows * (params.cols / format.block), context.multiprocessor_count);
  const cudaStream_t stream = context.stream;
  if (format.nvfp4) {
    HELIX_LAUNCH(grid, kFp4Threads, 0, stream, dequantize_kernel<T, kNvfp4Block>)(params);
  } else {
    HELIX_LAUNCH(grid, kFp4Threads, 0, stream, dequantize_kernel<T, kMxfp4Block>)(params);
  }
  HELIX_CUDA_LAUNCH_CHECK();
}

// After the device-independent checks (check_dequantize_fp4_args).
inline at::Tensor dequantize(const at::Tensor& packed_in, const at::Tensor& block_scales,
                             const at::Tensor& global_scale, const Fp4Format& format, at::ScalarType dtype,
                             const LaunchContext& context) {
  // The kernel reads each block's bytes as one 8- or 16-byte vector: a 16-byte-aligned base.
  const at::Tensor packed = packed_in.is_contiguous() && is_aligned(packed_in.data_ptr(), 16)
                                ? packed_in
                                : packed_in.clone(at::MemoryFormat::Contiguous);
  const at::Tensor scales = block_scales.contiguous();
  const int64_t rows = packed.size(0), cols = packed.size(1) * 2;
  at::Tensor out = at::empty({rows, cols}, packed.options().dtype(dtype));
  if (out.numel() == 0) return out;
  Fp4DequantizeParams params{};
  params.packed = packed.const_data_ptr<uint8_t>();
  params.scales = static_cast<const uint8_t*>(scales.const_data_ptr());
  params.global_scale = global_scale.const_data_ptr<float>();
  params.out = out.mutable_data_ptr();
  params.rows = rows;
  params.cols = cols;
  params.nvfp4 = format.nvfp4;
  switch (dtype) {
    case at::kFloat: run_dequantize<float>(params, format, context); break;
    case at::kHalf: run_dequantize<__half>(params, format, context); break;
    default: run_dequantize<__nv_bfloat16>(params, format, context); break;
  }
  return out;
}

}  // namespace fp4_launch
}  // namespace helix
