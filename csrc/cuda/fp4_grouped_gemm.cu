// fp4_grouped_gemm, CUDA op: device checks, then the shared launcher body
// (fp4_grouped_gemm_launch.h) on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_utils.h"
#include "flash_decode_args.h"  // check_inputs_on_device
#include "fp4_grouped_gemm_launch.h"

namespace helix {
namespace {

at::Tensor fp4_grouped_gemm_cuda(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& w_scales_in,
                                 const at::Tensor& w_global_scale, const at::Tensor& offs, c10::string_view fmt) {
  const Fp4Format format = parse_fp4_format("fp4_grouped_gemm", fmt);
  const GroupedGemmShape shape = check_fp4_grouped_gemm_args(x_in, w_in, w_scales_in, w_global_scale, offs, format);
  TORCH_CHECK(x_in.is_cuda(), "fp4_grouped_gemm: x must be a CUDA tensor here, got ", x_in.device());
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  if (check_inputs_on_device()) {
    check_offs_values(offs, shape.tokens);
    check_global_scale_values("fp4_grouped_gemm", "w_global_scale", w_global_scale);
  }
  return fp4_grouped_gemm_launch::run(x_in, w_in, w_scales_in, w_global_scale, offs, format, shape,
                                      launch_context(x_in.get_device()));
}

}  // namespace
}  // namespace helix

TORCH_LIBRARY_IMPL(helix, CUDA, m) { m.impl("fp4_grouped_gemm", &helix::fp4_grouped_gemm_cuda); }
