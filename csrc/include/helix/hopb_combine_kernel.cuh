// HOP-B fused combine, CUDA (torch-free): each CTA first waits, in one thread, until every
// peer's flag for the chunk has reached this rank's epoch (ld.acquire.sys: the peer's
// partial states written before its st.release.sys are then visible), with a bounded
// wall-clock spin that reports the missing peer instead of hanging. Then the CTA merges the
// peers' partial outputs read in place over peer memory (16-byte loads that bypass the
// caches, as the buffers are rewritten every step) with the merge_states math in fp32.
// hopb_all_reduce_kernel waits the same way, then sums the peers' parts (a one-shot
// all-reduce: the TP all-reduces of the decode step over the same peer memory).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "helix/hopb.h"
#include "helix/softmax_merge.h"
#include "helix/vec.cuh"

#if defined(HELIX_SIMT)
#include "helix_simt/ptx.h"
#endif

namespace helix {

struct HopbCombineParams {
  const void* peer_out[kHopbMaxPeers];     // [rows, heads, D] each, contiguous
  const float* peer_lse[kHopbMaxPeers];    // [rows, heads] each
  const int32_t* peer_flags[kHopbMaxPeers];
  const int32_t* epoch;                    // this rank's epochs, one per chunk slot
  int32_t* error;                          // set to 1 + peer on a timeout
  void* out;                               // [rows, heads, D]
  float* out_lse;                          // [rows, heads]
  int64_t rows;                            // rows * heads
  int64_t head_dim;
  uint64_t timeout_ns;
  int num_peers, chunk;
};

#if defined(HELIX_SIMT)
// The SIMT host runtime: C++ atomics of the same orders, and a steady host clock.
HELIX_DEVICE int32_t load_acquire_system(const int32_t* address) { return simt::load_acquire_system(address); }
HELIX_DEVICE void store_release_system(int32_t* address, int32_t value) { simt::store_release_system(address, value); }
HELIX_DEVICE void store_relaxed_system(int32_t* address, int32_t value) { simt::store_relaxed_system(address, value); }
HELIX_DEVICE uint64_t global_timer_ns() { return simt::global_timer_ns(); }
#else
HELIX_DEVICE int32_t load_acquire_system(const int32_t* address) {
  int32_t value;
  asm volatile("ld.acquire.sys.global.s32 %0, [%1];\n" : "=r"(value) : "l"(address) : "memory");
  return value;
}

HELIX_DEVICE void store_release_system(int32_t* address, int32_t value) {
  asm volatile("st.release.sys.global.s32 [%0], %1;\n" ::"l"(address), "r"(value) : "memory");
}

HELIX_DEVICE void store_relaxed_system(int32_t* address, int32_t value) {
  asm volatile("st.relaxed.sys.global.s32 [%0], %1;\n" ::"l"(address), "r"(value) : "memory");
}

HELIX_DEVICE uint64_t global_timer_ns() {
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(now));
  return now;
}
#endif  // HELIX_SIMT

// One thread: bump this chunk slot's epoch and publish it as the flag (after a system fence,
// so every write of earlier kernels in stream order is visible to peers that see the flag).
// (static: a non-template kernel defined in a header must not clash across translation units.)
static __global__ void hopb_signal_kernel(int32_t* flags, int32_t* epoch, int chunk) {
  const int32_t value = hopb_next_epoch(epoch[chunk]);
  epoch[chunk] = value;
  if (HELIX_PLANT(kPlantMissingReleaseFence)) {
    store_relaxed_system(flags + chunk, value);
    return;
  }
  __threadfence_system();
  store_release_system(flags + chunk, value);
}

// One thread: wait until every peer's flag for `chunk` has reached this rank's epoch (acquire
// loads, a bounded wall-clock spin); on a timeout, record 1 + the first missing peer in
// *error. Whether every peer signalled.
HELIX_DEVICE bool hopb_wait_for_peers(const int32_t* const* peer_flags, int num_peers, const int32_t* epoch,
                                      int chunk, uint64_t timeout_ns, int32_t* error) {
  const int32_t expected = epoch[chunk];
  const uint64_t start = global_timer_ns();
  int missing = 0;
  for (int p = 0; p < num_peers && missing == 0; ++p) {
    while (!hopb_flag_reached(load_acquire_system(peer_flags[p] + chunk), expected)) {
      if (global_timer_ns() - start > timeout_ns) {
        missing = p + 1;
        break;
      }
      __nanosleep(64);
    }
  }
  if (missing != 0) atomicCAS(error, 0, missing);
  return missing == 0;
}

// The CTA's gate: thread 0 waits for every peer's flag (hopb_wait_for_peers), the barrier
// orders every thread's reads after its acquire loads; whether all peers signalled (uniform).
template <typename Params>
HELIX_DEVICE bool hopb_cta_wait_for_peers(const Params& params) {
  HELIX_SHARED_VARIABLE(int, ready);
  if (threadIdx.x == 0) {
    ready = hopb_wait_for_peers(params.peer_flags, params.num_peers, params.epoch, params.chunk, params.timeout_ns,
                                params.error);
  }
  __syncthreads();
  return ready;
}

// VEC elements of a peer's buffer, read past the caches (the buffers are rewritten every step):
// one 16-byte load where VEC elements make 16 bytes.
template <typename T, int VEC>
HELIX_DEVICE ElementVector<T, VEC> load_peer_vector(const T* part) {
  ElementVector<T, VEC> values;
  if constexpr (sizeof(ElementVector<T, VEC>) == 16) {
    const uint4 raw = __ldcv(reinterpret_cast<const uint4*>(part));
    values = *reinterpret_cast<const ElementVector<T, VEC>*>(&raw);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) values.elements[i] = __ldcv(part + i);
  }
  return values;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kHopbThreads) hopb_combine_kernel(const HopbCombineParams params) {
  if (!hopb_cta_wait_for_peers(params)) return;

  T* out = static_cast<T*>(params.out);
  const int64_t vectors_per_row = params.head_dim / VEC;
  const int64_t total = params.rows * vectors_per_row;
  for (int64_t index = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; index < total;
       index += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = index / vectors_per_row;
    const int64_t element = (index - row * vectors_per_row) * VEC;
    const MergeScale merge =
        merge_scale(params.num_peers, [&](int p) { return __ldcv(params.peer_lse[p] + row); });
    float accumulator[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) accumulator[i] = 0.0f;
    for (int p = 0; p < params.num_peers; ++p) {
      const float weight = merge_weight(__ldcv(params.peer_lse[p] + row), merge);
      if (weight == 0.0f) continue;  // an absent part is never read
      const T* part = static_cast<const T*>(params.peer_out[p]) + row * params.head_dim + element;
      const ElementVector<T, VEC> values = load_peer_vector<T, VEC>(part);
#pragma unroll
      for (int i = 0; i < VEC; ++i) accumulator[i] += weight * ElementTraits<T>::to_float(values.elements[i]);
    }
    ElementVector<T, VEC> result;
#pragma unroll
    for (int i = 0; i < VEC; ++i) result.elements[i] = ElementTraits<T>::from_float(accumulator[i] * merge.normalizer);
    store_vector<T, VEC>(out + row * params.head_dim + element, result);
    if (element == 0) params.out_lse[row] = merge.lse;
  }
}

struct HopbAllReduceParams {
  const void* peer_parts[kHopbMaxPeers];   // numel elements each, contiguous
  const int32_t* peer_flags[kHopbMaxPeers];
  const int32_t* epoch;
  int32_t* error;
  void* out;                               // numel elements
  int64_t numel;
  uint64_t timeout_ns;
  int num_peers, chunk;
};

// The one-shot all-reduce over peer memory: each CTA waits for every peer's flag, then sums the
// peers' parts read in place, in peer order with fp32 accumulation, so every rank (each
// passing the same peers in the same order) gets the same bits.
template <typename T, int VEC>
__global__ void __launch_bounds__(kHopbThreads) hopb_all_reduce_kernel(const HopbAllReduceParams params) {
  if (!hopb_cta_wait_for_peers(params)) return;

  T* out = static_cast<T*>(params.out);
  const int64_t vectors = params.numel / VEC;
  for (int64_t index = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; index < vectors;
       index += int64_t{gridDim.x} * blockDim.x) {
    float accumulator[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) accumulator[i] = 0.0f;
    for (int p = 0; p < params.num_peers; ++p) {
      const T* part = static_cast<const T*>(params.peer_parts[p]) + index * VEC;
      const ElementVector<T, VEC> values = load_peer_vector<T, VEC>(part);
#pragma unroll
      for (int i = 0; i < VEC; ++i) accumulator[i] += ElementTraits<T>::to_float(values.elements[i]);
    }
    ElementVector<T, VEC> result;
#pragma unroll
    for (int i = 0; i < VEC; ++i) result.elements[i] = ElementTraits<T>::from_float(accumulator[i]);
    store_vector<T, VEC>(out + index * VEC, result);
  }
}

}  // namespace helix
