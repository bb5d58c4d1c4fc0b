// Shared constants of the HOP-B fused combine (CPU and CUDA).
#pragma once

namespace helix {

// The most KVP peers one combine reads (the CUDA kernel carries their addresses as parameters).
constexpr int kHopbMaxPeers = 32;
constexpr int kHopbThreads = 256;  // threads per CTA of the combine kernel

}  // namespace helix
