// Emulations of the inline PTX the kernels use, for the SIMT host runtime (HELIX_SIMT builds).
// helix/mma.cuh and helix/hopb_combine_kernel.cuh call these instead of their asm statements.
// Each follows the PTX ISA (section numbers of PTX ISA 9.2):
//   cp.async.cg.shared.global 16 with src-size     9.7.9.25.3.1
//   cp.async.commit_group / cp.async.wait_group     9.7.9.25.3.2 / 9.7.9.25.3.3
//   ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16  9.7.14.5.15
//   mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}  9.7.14.5.8 (fragment layouts)
//   ld.acquire.sys / st.release.sys                 9.7.9.8 / 9.7.9.11, memory model 8.4, 8.5, 8.8
//   %globaltimer                                    10.28
#pragma once

#include <stdint.h>

#include "helix_simt/runtime.h"

namespace helix {
namespace simt {

// The .shared window address of a generic pointer into this CTA's dynamic shared memory.
uint32_t shared_address(const void* pointer, Location where);

// cp.async of 16 bytes; source_bytes 0 reads nothing and zero-fills (src-size < cp-size).
// The destination is poisoned (0xFF bytes, NaN in every float type) when the copy is issued;
// the data lands when a cp.async.wait_group retires the copy's group.
void cp_async_16(uint32_t destination, const void* source, int source_bytes, Location where);
void cp_async_commit(Location where);
void cp_async_wait(int pending, Location where);

// Warp collectives: every lane of the warp must reach the same one.
void ldmatrix_x4(uint32_t (&fragment)[4], uint32_t address, bool transposed, Location where);
// D = A * B + C over one m16n8k16 tile; bf16 selects .bf16 (else .f16) operands.
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16, Location where);

// The per-lane fragment ownership of mma.m16n8k16 (PTX ISA 9.7.14.5.8), as used above:
// element `index` of lane `lane` sits at (row, column) of its matrix.
//   A (16 x 16, index 0..7), B (16 x 8 as K x N, index 0..3), C/D (16 x 8, index 0..3).
struct Coordinate {
  int row, column;
};
Coordinate mma_a_element(int lane, int index);
Coordinate mma_b_element(int lane, int index);
Coordinate mma_c_element(int lane, int index);
// ldmatrix (PTX ISA 9.7.14.5.15): element `half` (0 low, 1 high) of register `matrix` of lane
// `lane` is (row, column) of that 8 x 8 matrix as stored (row i at lane 8 * matrix + i's address).
Coordinate ldmatrix_element(int lane, int matrix, int half, bool transposed);

// ld.acquire.sys reports a value that a st.relaxed.sys published with no fence.sys before it
// in the storing thread: no release pattern (PTX ISA 8.8) orders the data behind the flag.
int32_t load_acquire_system(const int32_t* address, Location where = Location::current());
void store_release_system(int32_t* address, int32_t value);
void store_relaxed_system(int32_t* address, int32_t value);
// Forgets what the stores above recorded (memory is reused between tests).
void reset_publications();

}  // namespace simt
}  // namespace helix
