// What a launcher needs to know about the device it launches on, and the error check of CUDA
// runtime calls: shared by the CUDA launchers (nvcc) and the SIMT host runtime's (g++), whose
// CUDA runtime calls are answered by csrc/simt for an emulated device.
#pragma once

#include <cuda_runtime_api.h>

#if defined(HELIX_SIMT)
#include <c10/util/Exception.h>
#define HELIX_CUDA_CHECK(expression)                                                                    \
  do {                                                                                                  \
    const cudaError_t helix_cuda_status = (expression);                                                 \
    TORCH_CHECK(helix_cuda_status == cudaSuccess, "CUDA error ", static_cast<int>(helix_cuda_status), \
                " (emulated device) from ", #expression);                                              \
  } while (0)
#else
#include <c10/cuda/CUDAException.h>
#define HELIX_CUDA_CHECK(expression) C10_CUDA_CHECK(expression)
#endif
// After a kernel launch: a bad configuration is reported here.
#define HELIX_CUDA_LAUNCH_CHECK() HELIX_CUDA_CHECK(cudaGetLastError())

namespace helix {

struct LaunchContext {
  int device;
  int multiprocessor_count;
  cudaStream_t stream;
};

}  // namespace helix
