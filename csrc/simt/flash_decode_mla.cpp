// The flash_decode mla kernel instances, built by the host compiler for the SIMT runtime
// (the same source as the CUDA build's csrc/cuda/flash_decode_mla.cu).
#include "cuda/flash_decode_mla.cu"
