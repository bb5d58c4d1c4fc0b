// Torch-free helpers shared by the CPU and CUDA code of helix-ext.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HELIX_HOST_DEVICE __host__ __device__ __forceinline__
#define HELIX_DEVICE __device__ __forceinline__
#else
#define HELIX_HOST_DEVICE inline
#endif

#include <stdint.h>

namespace helix {

// The value every "absent" log-sum-exp takes: a shard with no keys, or a merge of nothing.
HELIX_HOST_DEVICE float neg_inf() { return -__builtin_huge_valf(); }

HELIX_HOST_DEVICE bool is_aligned(const void* pointer, int bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % bytes == 0;
}

}  // namespace helix
