// quantize_fp4 / dequantize_fp4, CUDA ops: device checks, then the shared launcher bodies
// (fp4_launch.h) on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_utils.h"
#include "flash_decode_args.h"  // check_inputs_on_device
#include "fp4_launch.h"

namespace helix {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_fp4_cuda(const at::Tensor& x_in, c10::string_view fmt,
                                                                 const std::optional<at::Tensor>& global_scale) {
  const Fp4Format format = check_quantize_fp4_args(x_in, fmt, global_scale);
  TORCH_CHECK(x_in.is_cuda(), "quantize_fp4: x must be a CUDA tensor here, got ", x_in.device());
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  if (global_scale.has_value() && check_inputs_on_device()) {
    check_global_scale_values("quantize_fp4", "global_scale", *global_scale);
  }
  return fp4_launch::quantize(x_in, format, global_scale, launch_context(x_in.get_device()));
}

at::Tensor dequantize_fp4_cuda(const at::Tensor& packed_in, const at::Tensor& block_scales, const at::Tensor& global_scale,
                               c10::string_view fmt, at::ScalarType dtype) {
  const Fp4Format format = check_dequantize_fp4_args(packed_in, block_scales, global_scale, fmt, dtype);
  TORCH_CHECK(packed_in.is_cuda(), "dequantize_fp4: packed must be a CUDA tensor here, got ", packed_in.device());
  const c10::cuda::CUDAGuard device_guard(packed_in.device());
  if (check_inputs_on_device()) check_global_scale_values("dequantize_fp4", "global_scale", global_scale);
  return fp4_launch::dequantize(packed_in, block_scales, global_scale, format, dtype,
                                launch_context(packed_in.get_device()));
}

}  // namespace
}  // namespace helix

TORCH_LIBRARY_IMPL(helix, CUDA, m) {
  m.impl("quantize_fp4", &helix::quantize_fp4_cuda);
  m.impl("dequantize_fp4", &helix::dequantize_fp4_cuda);
}
