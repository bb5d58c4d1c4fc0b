// The SIMT host runtime: runs the unmodified CUDA kernels of csrc/include/helix on the CPU.
//
// Compiled with the host C++ compiler and -DHELIX_SIMT, helix/common.h includes this header
// instead of relying on nvcc: it supplies the CUDA built-ins the kernels use (threadIdx and
// friends, __syncthreads, warp shuffles, atomics, cache-hinted loads, shared memory) and the
// launch that HELIX_LAUNCH expands to. The PTX wrappers (helix/mma.cuh, the HOP-B flag
// helpers) call the emulations declared in helix_simt/ptx.h.
//
// Execution model: the threads of a CTA are cooperative user-level threads (fibers) on one OS
// thread, run one CTA at a time. A thread runs until it reaches a synchronization point
// (__syncthreads, a warp collective: shuffle, vote, __syncwarp, ldmatrix, mma.sync) or exits;
// the scheduler then picks the next ready thread by the chosen schedule. A barrier or collective
// that an awaited thread can never reach is reported (kernel, source line, threads), never a hang.
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include <cmath>
#include <functional>
#include <source_location>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// Launch bounds only guide nvcc's register allocation.
#undef __launch_bounds__
#define __launch_bounds__(...)

// The built-in index variables: set by the scheduler each time it resumes a thread.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

namespace helix {
namespace simt {

using Location = std::source_location;

// A hazard, race, deadlock or bad access found while a kernel ran (thrown by the launch).
struct KernelError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// How threads between two synchronization points are ordered (and CTAs within a grid).
enum class Schedule : int {
  kInOrder = 0,     // lowest ready thread first (warp 0 runs ahead), CTAs in grid order
  kReversed = 1,    // highest ready thread first (the last warp runs ahead), CTAs reversed
  kRoundRobin = 2,  // ready threads in FIFO order (all warps advance together)
  kShuffle = 3,     // a seeded random ready thread each time, CTAs shuffled
};

struct Settings {
  Schedule schedule = Schedule::kInOrder;
  uint64_t seed = 0;
  uint8_t poison = 0xFF;           // fills shared memory at launch (0xFF: NaN in every float type)
  int multiprocessor_count = 132;  // what the launchers' grid and split plans see (H200: 132)
  int planted_defect = 0;          // HELIX_PLANTED_DEFECTS builds: the defect switched on (0: none)
};

// The settings of launches made by this OS thread.
Settings& settings();

// ---- per-thread operations (called from kernel code through the wrappers) ----
void sync_threads(Location where);
void sync_warp(unsigned mask, Location where);
// A shuffle of a value of up to 8 bytes; kind: 0 idx, 1 up, 2 down, 3 xor (PTX shfl.sync modes).
uint64_t shuffle(uint64_t value, int kind, unsigned mask, int operand, int width, Location where);
// Votes: kind 0 ballot, 1 all, 2 any; returns the ballot mask or 0/1.
unsigned vote(int kind, unsigned mask, bool predicate, Location where);

void* dynamic_shared_memory();
size_t dynamic_shared_bytes();
// A statically sized __shared__ variable: one exact-size allocation per CTA, keyed by `key`.
void* static_shared(const void* key, size_t bytes, size_t alignment);

// %globaltimer (a steady host clock, ns) and __nanosleep; %laneid of the running thread.
uint64_t global_timer_ns();
void nanosleep_ns(unsigned nanoseconds);
// fence.sc.sys (__threadfence_system): orders this thread's earlier writes before later stores.
void fence_system();
int lane_id();

// ---- launches ----
using KernelBody = std::function<void()>;
// Runs body once per thread of every CTA of the grid (or reports the launch error the CUDA
// runtime would: bad grid/block, too much shared memory for the kernel's attribute). Throws
// KernelError for a fault found while running.
cudaError_t launch(const void* kernel, const char* name, dim3 grid, dim3 block, size_t dynamic_smem,
                   const KernelBody& body, Location where);

template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  const char* name;
  dim3 grid, block;
  size_t dynamic_smem;
  Location where;

  template <typename... Args>
  void operator()(Args&&... args) const {
    // Kernel parameters are copied once, as the launch copies them to constant memory.
    std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    launch(reinterpret_cast<const void*>(kernel), name, grid, block, dynamic_smem,
           [&] { std::apply(kernel, params); }, where);
  }
};

template <typename... Params>
Launch<Params...> make_launch(void (*kernel)(Params...), const char* name, dim3 grid, dim3 block,
                              size_t dynamic_smem, Location where = Location::current()) {
  return {kernel, name, grid, block, dynamic_smem, where};
}

// True when defect `id` is planted (HELIX_PLANTED_DEFECTS builds only; see helix/common.h).
bool planted(int id);

}  // namespace simt
}  // namespace helix

// The CUDA runtime's templated launch-attribute calls (nvcc-only in cuda_runtime.h), answered
// by the SIMT runtime's emulated device (csrc/simt/runtime.cpp).
template <typename... Params>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attribute, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attribute, value);
}
template <typename... Params>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void (*kernel)(Params...),
                                                                 int block_size, size_t dynamic_smem) {
  return ::cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(blocks, reinterpret_cast<const void*>(kernel),
                                                                  block_size, dynamic_smem, cudaOccupancyDefault);
}

// ---- the CUDA device built-ins the kernels use, for the host ----

inline void __syncthreads(helix::simt::Location where = helix::simt::Location::current()) {
  helix::simt::sync_threads(where);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, helix::simt::Location where = helix::simt::Location::current()) {
  helix::simt::sync_warp(mask, where);
}

namespace helix {
namespace simt {
template <typename T>
T shuffle_typed(T value, int kind, unsigned mask, int operand, int width, Location where) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move values of up to 8 bytes");
  uint64_t bits = 0;
  __builtin_memcpy(&bits, &value, sizeof(T));
  bits = shuffle(bits, kind, mask, operand, width, where);
  T result;
  __builtin_memcpy(&result, &bits, sizeof(T));
  return result;
}
}  // namespace simt
}  // namespace helix

template <typename T>
T __shfl_sync(unsigned mask, T value, int source_lane, int width = 32,
              helix::simt::Location where = helix::simt::Location::current()) {
  return helix::simt::shuffle_typed(value, 0, mask, source_lane, width, where);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32,
                 helix::simt::Location where = helix::simt::Location::current()) {
  return helix::simt::shuffle_typed(value, 1, mask, static_cast<int>(delta), width, where);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32,
                   helix::simt::Location where = helix::simt::Location::current()) {
  return helix::simt::shuffle_typed(value, 2, mask, static_cast<int>(delta), width, where);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32,
                  helix::simt::Location where = helix::simt::Location::current()) {
  return helix::simt::shuffle_typed(value, 3, mask, lane_mask, width, where);
}
inline unsigned __ballot_sync(unsigned mask, int predicate,
                              helix::simt::Location where = helix::simt::Location::current()) {
  return helix::simt::vote(0, mask, predicate != 0, where);
}
inline int __all_sync(unsigned mask, int predicate, helix::simt::Location where = helix::simt::Location::current()) {
  return static_cast<int>(helix::simt::vote(1, mask, predicate != 0, where));
}
inline int __any_sync(unsigned mask, int predicate, helix::simt::Location where = helix::simt::Location::current()) {
  return static_cast<int>(helix::simt::vote(2, mask, predicate != 0, where));
}

// Cache-hinted loads are plain loads on the host (the hints change no value).
template <typename T>
inline T __ldg(const T* address) {
  return *address;
}
template <typename T>
inline T __ldcs(const T* address) {
  return *address;
}
template <typename T>
inline T __ldcv(const T* address) {
  return *address;
}

// Atomics: one OS thread runs a CTA, but a host thread may share the memory (HOP-B flags),
// so they are real atomic operations.
inline unsigned atomicMax(unsigned* address, unsigned value) {
  unsigned old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
  while (old < value && !__atomic_compare_exchange_n(address, &old, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
inline int atomicMax(int* address, int value) {
  int old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
  while (old < value && !__atomic_compare_exchange_n(address, &old, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
inline int atomicCAS(int* address, int compare, int value) {
  __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;
}
inline int atomicAdd(int* address, int value) { return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST); }
inline float atomicAdd(float* address, float value) {
  float old = *address;
  float desired = old + value;
  while (!__atomic_compare_exchange(address, &old, &desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    desired = old + value;
  }
  return old;
}

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { helix::simt::fence_system(); }
inline void __nanosleep(unsigned nanoseconds) { helix::simt::nanosleep_ns(nanoseconds); }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
