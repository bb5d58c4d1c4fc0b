// Small torch-aware helpers for the CUDA launchers. Only c10/cuda headers: ATen/cuda's
// CUDAContext pulls in cuBLAS/cuSPARSE headers that a bare toolkit may not ship.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>

#include "cuda/launch_context.h"

namespace helix {

// Multiprocessor count of a device, queried once per device.
inline int multiprocessor_count(int device) {
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<int>, kMaxDevices> cache{};
  if (device >= 0 && device < kMaxDevices) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < kMaxDevices) cache[device].store(count, std::memory_order_relaxed);
  return count;
}

// The launch context of a device: its multiprocessor count and the current stream.
inline LaunchContext launch_context(int device) {
  return {device, multiprocessor_count(device), c10::cuda::getCurrentCUDAStream(device)};
}

}  // namespace helix
