// The flash_decode d128 kernel instances, built by the host compiler for the SIMT runtime
// (the same source as the CUDA build's csrc/cuda/flash_decode_d128.cu).
#include "cuda/flash_decode_d128.cu"
