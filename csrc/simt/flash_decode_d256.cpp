// The flash_decode d256 kernel instances, built by the host compiler for the SIMT runtime
// (the same source as the CUDA build's csrc/cuda/flash_decode_d256.cu).
#include "cuda/flash_decode_d256.cu"
