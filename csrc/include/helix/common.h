// Torch-free helpers shared by the CPU and CUDA code of helix-ext.
#pragma once

#if defined(HELIX_SIMT)
// The SIMT host runtime (csrc/simt) compiles the CUDA kernels with the host compiler.
#include "helix_simt/runtime.h"
#define HELIX_HOST_DEVICE inline
#define HELIX_DEVICE inline
#elif defined(__CUDACC__) || defined(__HIPCC__)
#define HELIX_HOST_DEVICE __host__ __device__ __forceinline__
#define HELIX_DEVICE __device__ __forceinline__
#else
#define HELIX_HOST_DEVICE inline
#endif

// The few CUDA-only constructs of the kernel headers, behind wrappers that the SIMT runtime
// implements for the host:
//   HELIX_LAUNCH(grid, block, smem, stream, kernel)(args...)   kernel<<<grid, block, smem, stream>>>(args...)
//   HELIX_DYNAMIC_SHARED(type, name)      extern __shared__ __align__(16) type name[]
//   HELIX_SHARED_VARIABLE(type, name)     __shared__ type name
#if defined(HELIX_SIMT)
#define HELIX_LAUNCH(grid, block, smem, stream, ...) \
  ::helix::simt::make_launch(&__VA_ARGS__, #__VA_ARGS__, grid, block, smem)
#define HELIX_DYNAMIC_SHARED(type, name) type* const name = static_cast<type*>(::helix::simt::dynamic_shared_memory())
#define HELIX_SHARED_VARIABLE(type, name)                                                        \
  static const char name##_shared_key = 0;                                                       \
  type& name = *static_cast<type*>(::helix::simt::static_shared(&name##_shared_key, sizeof(type), alignof(type)))
#else
#define HELIX_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define HELIX_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#define HELIX_SHARED_VARIABLE(type, name) __shared__ type name
#endif

// Planted defects (tests/simt/test_planted_defects.py): HELIX_PLANT(id) is true where defect
// `id` is switched on. Only SIMT builds with HELIX_PLANTED_DEFECTS define it to anything but
// false; in the CUDA build it is the constant false and compiles away.
#if defined(HELIX_SIMT) && defined(HELIX_PLANTED_DEFECTS)
#define HELIX_PLANT(id) (::helix::simt::planted(id))
#else
#define HELIX_PLANT(id) false
#endif

#include <stdint.h>

namespace helix {

// The planted defects (HELIX_PLANT); each is caught by a test of the SIMT harness.
enum PlantedDefect : int {
  kPlantMissingBarrier = 1,       // flash_decode: no __syncthreads between a tile's arrival and its use
  kPlantWaitGroupOffByOne = 2,    // flash_decode: cp.async.wait_group leaves one group too many in flight
  kPlantSwappedFragment = 3,      // flash_decode: two registers of the P fragment of P V swapped
  kPlantTileBoundOffByOne = 4,    // flash_decode: the split's last token + 1 is not masked
  kPlantLoopBoundOffByOne = 5,    // merge_states: the grid-stride loop runs one vector past the end
  kPlantMissingReleaseFence = 6,  // hopb_signal: the flag is published by a relaxed store, no fence
  kPlantMissingExchangeBarrier = 7,  // flash_decode (WARPS_V > 1): partial scores read before all are written
};

// The canonical quiet NaN of each element type: what every device writes for a NaN where bits
// must agree (x86 keeps an operand's sign and payload, a GPU makes its own).
constexpr uint32_t kQuietNanBitsF32 = 0x7FC00000u;
constexpr uint16_t kQuietNanBitsF16 = 0x7E00u;
constexpr uint16_t kQuietNanBitsBf16 = 0x7FC0u;

// The value every "absent" log-sum-exp takes: a shard with no keys, or a merge of nothing.
HELIX_HOST_DEVICE float neg_inf() { return -__builtin_huge_valf(); }

HELIX_HOST_DEVICE bool is_aligned(const void* pointer, int bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % bytes == 0;
}

}  // namespace helix
