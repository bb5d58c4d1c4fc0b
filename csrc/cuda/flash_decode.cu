// flash_decode, CUDA op: device checks, then the shared launcher body (flash_decode_launch.h)
// on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_utils.h"
#include "flash_decode_launch.h"

namespace helix {
namespace {

std::tuple<at::Tensor, at::Tensor> flash_decode_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                                     const std::optional<at::Tensor>& v_cache,
                                                     const at::Tensor& block_table, const at::Tensor& seq_lens,
                                                     double softmax_scale, int64_t head_dim_v,
                                                     const std::optional<at::Tensor>& k_scale,
                                                     const std::optional<at::Tensor>& v_scale, int64_t num_splits,
                                                     const std::optional<at::Tensor>& query_key_lens) {
  const FlashDecodeShape shape = check_flash_decode_args(q, k_cache, v_cache, block_table, seq_lens, softmax_scale,
                                                         head_dim_v, k_scale, v_scale, num_splits, query_key_lens);
  TORCH_CHECK(q.is_cuda(), "flash_decode: q must be a CUDA tensor here, got ", q.device());
  const c10::cuda::CUDAGuard device_guard(q.device());
  if (check_inputs_on_device()) check_flash_decode_values(block_table, seq_lens, query_key_lens, shape);
  return flash_decode_launch::run(q, k_cache, v_cache, block_table, seq_lens, softmax_scale, k_scale, v_scale,
                                  num_splits, query_key_lens, shape, launch_context(q.get_device()));
}

}  // namespace
}  // namespace helix

TORCH_LIBRARY_IMPL(helix, CUDA, m) { m.impl("flash_decode", &helix::flash_decode_cuda); }
