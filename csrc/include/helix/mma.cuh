// Torch-free PTX wrappers for the tensor-core kernels: cp.async copies, ldmatrix loads and
// mma.sync m16n8k16 (bf16/fp16 operands, fp32 accumulators). All of them run on sm_80 and
// later, Hopper and Blackwell included, so the kernels built on them are portable.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "helix/common.h"

#if defined(HELIX_SIMT)
#include <type_traits>

#include "helix_simt/ptx.h"
#endif

namespace helix {
namespace ptx {

#if defined(HELIX_SIMT)
// The SIMT host runtime's emulations (csrc/simt, PTX ISA semantics); same signatures.
HELIX_DEVICE uint32_t shared_address(const void* pointer, simt::Location where = simt::Location::current()) {
  return simt::shared_address(pointer, where);
}

HELIX_DEVICE void cp_async_16(uint32_t destination, const void* source, bool valid,
                              simt::Location where = simt::Location::current()) {
  simt::cp_async_16(destination, source, valid ? 16 : 0, where);
}

HELIX_DEVICE void cp_async_commit(simt::Location where = simt::Location::current()) { simt::cp_async_commit(where); }

template <int pending>
HELIX_DEVICE void cp_async_wait(simt::Location where = simt::Location::current()) {
  simt::cp_async_wait(pending, where);
}

HELIX_DEVICE void ldmatrix_x4(uint32_t (&fragment)[4], uint32_t address,
                              simt::Location where = simt::Location::current()) {
  simt::ldmatrix_x4(fragment, address, false, where);
}

HELIX_DEVICE void ldmatrix_x4_transposed(uint32_t (&fragment)[4], uint32_t address,
                                         simt::Location where = simt::Location::current()) {
  simt::ldmatrix_x4(fragment, address, true, where);
}

template <typename T>
HELIX_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                               simt::Location where = simt::Location::current()) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "mma operands are bf16 or fp16");
  simt::mma_m16n8k16(d, a, b0, b1, std::is_same_v<T, __nv_bfloat16>, where);
}
#else
HELIX_DEVICE uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// 16-byte global -> shared copy that bypasses L1 (.cg). With valid == false nothing is
// read and the 16 destination bytes are zero-filled (src-size 0).
HELIX_DEVICE void cp_async_16(uint32_t destination, const void* source, bool valid) {
  const int source_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(destination), "l"(source),
               "r"(source_bytes)
               : "memory");
}

HELIX_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most `pending` of this thread's committed groups are still in flight.
template <int pending>
HELIX_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
HELIX_DEVICE void ldmatrix_x4(uint32_t (&fragment)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3])
               : "r"(address));
}

HELIX_DEVICE void ldmatrix_x4_transposed(uint32_t (&fragment)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3])
               : "r"(address));
}

// D += A * B for one m16n8k16 tile: A row-major 16x16, B "col" (k-major) 16x8, fp32 D.
template <typename T>
HELIX_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
HELIX_DEVICE void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
HELIX_DEVICE void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#endif  // HELIX_SIMT

// Two floats rounded (to nearest even) into one register of two 16-bit values, `low` in
// the low half: the element order of mma fragments.
template <typename T>
HELIX_DEVICE uint32_t pack_pair(float low, float high);

template <>
HELIX_DEVICE uint32_t pack_pair<__nv_bfloat16>(float low, float high) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
  return *reinterpret_cast<const uint32_t*>(&pair);
}

template <>
HELIX_DEVICE uint32_t pack_pair<__half>(float low, float high) {
  const __half2 pair = __floats2half2_rn(low, high);
  return *reinterpret_cast<const uint32_t*>(&pair);
}

}  // namespace ptx
}  // namespace helix
