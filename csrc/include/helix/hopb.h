// Shared constants of the HOP-B fused combine (CPU and CUDA).
#pragma once

#include <stdint.h>

#include "helix/common.h"

namespace helix {

// The most KVP peers one combine reads (the CUDA kernel carries their addresses as parameters).
constexpr int kHopbMaxPeers = 32;
constexpr int kHopbThreads = 256;  // threads per CTA of the combine kernel
// The longest a combine waits for a peer: the wait is bounded, and the CUDA kernel counts it
// in 64-bit nanoseconds (a larger timeout_s is rejected, not silently wrapped).
constexpr double kHopbMaxTimeoutSeconds = 3600.0;

// Epochs and flags are int32 tensors holding 32-bit serial numbers: they wrap (after 2^32
// signals of a slot) and are compared in serial-number arithmetic (RFC 1982), so the wrap is
// no different from any other step: a flag one signal behind the epoch is stale whatever
// their values. Unsigned arithmetic: no signed overflow, and the conversions back to int32
// are modular (C++20).
HELIX_HOST_DEVICE int32_t hopb_next_epoch(int32_t epoch) {
  return static_cast<int32_t>(static_cast<uint32_t>(epoch) + 1u);
}

// True once a peer's flag has reached (or passed) this rank's epoch: flag - expected, taken
// modulo 2^32, is in [0, 2^31).
HELIX_HOST_DEVICE bool hopb_flag_reached(int32_t flag, int32_t expected) {
  return static_cast<int32_t>(static_cast<uint32_t>(flag) - static_cast<uint32_t>(expected)) >= 0;
}

}  // namespace helix
