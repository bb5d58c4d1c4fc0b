"""Per-CTA emulator of helix's FP4 CUDA kernels (no GPU needed).

A GPU-free check of the kernels' index arithmetic, fragment mappings, pipeline and barriers
against the documented hardware semantics: run it after changing the kernels (and change it
with them; it mirrors their formulas, it does not read the .cuh files).
  python tools/emulate_fp4_kernels.py          (about 150 s; see __main__ for options)
It found three launcher bugs (K = 0, misaligned x / w / packed views) in the first version and
caught 13 of 13 planted kernel bugs.

Emulates, thread by thread (numpy-vectorised over the 128 threads of a CTA), every
address, lane mapping and fragment index of
  csrc/include/helix/fp4_gemm_kernel.cuh : fp4_grouped_gemm_kernel<M_TILES>, finalize kernel
  csrc/cuda/fp4_grouped_gemm.cu          : launcher (x/w handling, split-K plan, y/partial)
  csrc/include/helix/fp4_quantize_kernel.cuh + csrc/cuda/fp4.cu : amax/quantize/dequantize
with
  * a shared-memory model that tracks, per byte: initialisation, cp.async copies in flight,
    the last writer / readers per barrier epoch (races = cross-thread conflicts without an
    intervening __syncthreads), alignment and bounds of every access;
  * a global-memory model (bounds, natural alignment of every vector access with the real
    base addresses, uninitialised reads of torch.empty buffers, write-write conflicts
    between CTAs / threads);
  * cp.async commit/wait_group accounting per thread (copies land at the wait that retires
    their group; any touch of an in-flight byte is a race);
  * mma.sync m16n8k16 row.col bf16 -> fp32 with the PTX ISA fragment layouts
    (A: row g / g+8, col 2t+(i&1) (+8 for i>=4); B: row 2t+(i&1) (+8 for i>=2), col g;
     C: row g / g+8, col 2t+(i&1)), products exact, one fp32 rounding per mma;
  * __hmul2 bf16 (RNE), __float2bfloat16_rn, float32 global-scale multiply.

Planted bugs are switched on with the `bugs` argument (see PLANTED_BUGS).
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import torch

ROOT = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, __import__("os").path.join(ROOT, "tests"))
from helix_ext.reference import (dequantize_fp4_reference, fp4_grouped_gemm_reference,  # noqa: E402
                                 quantize_fp4_reference)
from tolerance import assert_close_to_reference  # noqa: E402


class EmuError(Exception):
    """A bug the emulator detected (race, OOB, misalignment, uninitialised read, ...)."""


# ------------------------------------------------------------------------- numerics

def f32_bits(f):
    return np.asarray(f, np.float32).view(np.uint32)


def bits_f32(u):
    return np.asarray(u, np.uint32).view(np.float32)


def f32_to_bf16_bits(f):
    """__float2bfloat16_rn: round to nearest even; NaN -> canonical NaN."""
    f = np.asarray(f, np.float32)
    u = f.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    r = np.where(np.isnan(f), 0x7FFF, r)
    return r.astype(np.uint32)


def bf16_bits_to_f32(b):
    return (np.asarray(b, np.uint32) << 16).astype(np.uint32).view(np.float32)


def e2m1_to_float(code):
    """helix/fp4.h e2m1_to_float, formula by formula."""
    code = np.asarray(code, np.uint32)
    exponent = (code >> 1) & 3
    mantissa = code & 1
    magnitude = np.where(exponent == 0, np.float32(0.5) * mantissa.astype(np.float32),
                         (2 + mantissa).astype(np.float32) * (np.uint32(1) << exponent).astype(np.float32)
                         * np.float32(0.25)).astype(np.float32)
    return np.where((code & 8) != 0, -magnitude, magnitude).astype(np.float32)


def fp8_e4m3_to_float(code):
    """helix/fp8.h fp8_e4m3_to_float."""
    code = np.asarray(code, np.uint32) & 0xFF
    sign = (code & 0x80) << 24
    exponent = (code >> 3) & 0xF
    mantissa = code & 7
    normal = bits_f32((sign | ((exponent + 120) << 23) | (mantissa << 20)).astype(np.uint32))
    sub_mag = mantissa.astype(np.float32) * np.float32(0.001953125)
    sub = np.where(sign != 0, -sub_mag, sub_mag).astype(np.float32)
    nan = bits_f32((sign | 0x7FC00000).astype(np.uint32))
    out = np.where(exponent == 0, sub, normal)
    return np.where((exponent == 0xF) & (mantissa == 7), nan, out).astype(np.float32)


def round_f64_to_bf16_bits(p64):
    """Exact value (float64) -> bf16 bits, round to nearest even, subnormals kept (no flush)."""
    p64 = np.asarray(p64, np.float64)
    out = np.zeros(p64.shape, np.uint32)
    with np.errstate(invalid="ignore", over="ignore"):
        normal = np.abs(p64) >= 2.0 ** -126
        # normal range: a float64 with <= 24 significant bits converts exactly to fp32 first
        p32 = p64.astype(np.float32)
        assert np.all(~normal | ~np.isfinite(p64) | (p32.astype(np.float64) == p64)), "product not exact in fp32"
        out = np.where(normal | ~np.isfinite(p64), f32_to_bf16_bits(p32), out)
        # subnormal bf16: multiples of 2^-133, round half to even
        q = np.rint(np.where(normal | ~np.isfinite(p64), 0.0, p64) / 2.0 ** -133)  # rint = half-even
        sub = (np.abs(q) * 2.0 ** -133).astype(np.float32)
        sub_bits = f32_to_bf16_bits(sub) | np.where(np.signbit(p64), 0x8000, 0).astype(np.uint32)
        out = np.where(normal | ~np.isfinite(p64), out, sub_bits)
    return out.astype(np.uint32)


def hmul2_bf16(a, b):
    """__hmul2 on bf16x2 words: each half the exact product (float64 holds it: <= 16 significant
    bits) rounded once, to nearest even, to bf16 (PTX mul/fma .bf16x2 keep subnormals)."""
    a = np.asarray(a, np.uint32)
    b = np.asarray(b, np.uint32)
    out = np.zeros(np.broadcast(a, b).shape, np.uint32)
    for shift in (0, 16):
        x = bf16_bits_to_f32((a >> shift) & 0xFFFF).astype(np.float64)
        y = bf16_bits_to_f32((b >> shift) & 0xFFFF).astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            p64 = x * y
        out |= round_f64_to_bf16_bits(p64) << shift
    return out


def pack_pair_bf16(low, high):
    return f32_to_bf16_bits(low) | (f32_to_bf16_bits(high) << 16)


# ------------------------------------------------------------------------- memory models

CONFLICTS = None  # a list: record cross-CTA write-write conflicts instead of raising (invalid-offs runs)


class GBuf:
    """A global-memory allocation: exact size, real base address, init + writer tracking."""

    def __init__(self, name, data_bytes, base, init=True, readonly=False):
        self.name = name
        self.data = np.array(data_bytes, dtype=np.uint8).reshape(-1).copy()
        self.base = int(base)
        self.init = np.full(self.data.size, bool(init))
        self.writer = np.full(self.data.size, -1, np.int64)
        self.readonly = readonly

    def _index(self, offsets, nbytes, what):
        offsets = np.asarray(offsets, np.int64).reshape(-1)
        if offsets.size and ((offsets < 0).any() or (offsets + nbytes > self.data.size).any()):
            bad = offsets[(offsets < 0) | (offsets + nbytes > self.data.size)][0]
            raise EmuError(f"{what}: out-of-bounds {nbytes}-byte access of {self.name} at byte {bad} "
                           f"(size {self.data.size})")
        if offsets.size and ((self.base + offsets) % nbytes != 0).any():
            bad = offsets[(self.base + offsets) % nbytes != 0][0]
            raise EmuError(f"{what}: misaligned {nbytes}-byte access of {self.name} at address "
                           f"0x{self.base + bad:x}")
        return offsets[:, None] + np.arange(nbytes)

    def load(self, offsets, nbytes, what="load", check_init=True):
        idx = self._index(offsets, nbytes, what)
        if check_init and idx.size and not self.init[idx].all():
            raise EmuError(f"{what}: read of uninitialised bytes of {self.name}")
        return self.data[idx]

    def store(self, offsets, values, writer, what="store"):
        assert not self.readonly
        values = np.asarray(values, np.uint8)
        nbytes = values.shape[-1]
        idx = self._index(offsets, nbytes, what)
        flat = idx.reshape(-1)
        if np.unique(flat).size != flat.size:
            raise EmuError(f"{what}: two threads of one instruction write the same bytes of {self.name}")
        previous = self.writer[flat]
        if ((previous != -1) & (previous != writer)).any() and CONFLICTS is not None:
            CONFLICTS.append(self.name)
        elif ((previous != -1) & (previous != writer)).any():
            raise EmuError(f"{what}: write-write conflict on {self.name} between CTA {writer} and "
                           f"CTA {previous[(previous != -1) & (previous != writer)][0]}")
        self.data[idx] = values.reshape(idx.shape)
        self.init[flat] = True
        self.writer[flat] = writer


def u32_to_bytes(words):
    words = np.asarray(words, np.uint32)
    return words.astype("<u4").view(np.uint8).reshape(words.shape + (4,))


def bytes_to_u32(b):
    b = np.ascontiguousarray(b, np.uint8)
    return b.view("<u4").reshape(b.shape[:-1] + (b.shape[-1] // 4,))


class Smem:
    """Dynamic shared memory of one CTA with per-byte race tracking."""

    def __init__(self, nbytes, threads):
        self.size = nbytes
        self.data = np.full(nbytes, 0xA5, np.uint8)  # garbage
        self.init = np.zeros(nbytes, bool)
        self.w_epoch = np.full(nbytes, -1, np.int64)
        self.w_tid = np.full(nbytes, -1, np.int64)
        self.r_epoch = np.full(nbytes, -1, np.int64)
        self.r_tid = np.full(nbytes, -1, np.int64)  # -2: several readers
        self.inflight = np.zeros(nbytes, np.int64)
        self.epoch = 0
        self.threads = threads
        self.committed = np.zeros(threads, np.int64)  # cp.async groups committed per thread
        self.pending = []  # records: dict(tid, dst, data, group)
        self.stats = dict(reads=0, writes=0, copies=0, barriers=0)

    def _expand(self, tids, addrs, nbytes, what):
        addrs = np.asarray(addrs, np.int64).reshape(-1)
        tids = np.asarray(tids, np.int64).reshape(-1)
        if addrs.size and ((addrs < 0).any() or (addrs + nbytes > self.size).any()):
            raise EmuError(f"{what}: shared-memory access out of bounds (size {self.size})")
        if addrs.size and (addrs % nbytes != 0).any():
            raise EmuError(f"{what}: misaligned {nbytes}-byte shared-memory access")
        idx = (addrs[:, None] + np.arange(nbytes)).reshape(-1)
        t = np.repeat(tids, nbytes)
        return idx, t

    def read(self, tids, addrs, nbytes, what="smem read"):
        idx, t = self._expand(tids, addrs, nbytes, what)
        self.stats["reads"] += 1
        if idx.size == 0:
            return np.zeros((0, nbytes), np.uint8)
        if (self.inflight[idx] > 0).any():
            raise EmuError(f"{what}: reads bytes whose cp.async is still in flight")
        if not self.init[idx].all():
            raise EmuError(f"{what}: reads uninitialised shared memory")
        raw = (self.w_epoch[idx] == self.epoch) & (self.w_tid[idx] != t)
        if raw.any():
            raise EmuError(f"{what}: read-after-write race (thread {t[raw][0]} reads byte {idx[raw][0]} written "
                           f"by thread {self.w_tid[idx][raw][0]} with no barrier in between)")
        order = np.argsort(idx, kind="stable")
        b, tt = idx[order], t[order]
        uniq, start = np.unique(b, return_index=True)
        tmin = np.minimum.reduceat(tt, start)
        tmax = np.maximum.reduceat(tt, start)
        new = np.where(tmin == tmax, tmin, -2)
        same = self.r_epoch[uniq] == self.epoch
        old = self.r_tid[uniq]
        self.r_tid[uniq] = np.where(same & (old != new), -2, new)
        self.r_epoch[uniq] = self.epoch
        return self.data[idx].reshape(-1, nbytes)

    def _check_write(self, idx, t, what):
        if (self.inflight[idx] > 0).any():
            raise EmuError(f"{what}: writes bytes whose cp.async is still in flight")
        order = np.argsort(idx, kind="stable")
        b, tt = idx[order], t[order]
        uniq, start = np.unique(b, return_index=True)
        if (np.minimum.reduceat(tt, start) != np.maximum.reduceat(tt, start)).any():
            raise EmuError(f"{what}: two threads write the same shared byte in one instruction")
        waw = (self.w_epoch[idx] == self.epoch) & (self.w_tid[idx] != t)
        if waw.any():
            raise EmuError(f"{what}: write-after-write race on byte {idx[waw][0]}")
        war = (self.r_epoch[idx] == self.epoch) & (self.r_tid[idx] != t) & (self.r_tid[idx] != -1)
        if war.any():
            raise EmuError(f"{what}: write-after-read race (thread {t[war][0]} overwrites byte {idx[war][0]} "
                           f"read by thread {self.r_tid[idx][war][0]} in the same barrier interval)")

    def write(self, tids, addrs, values, what="smem write"):
        values = np.asarray(values, np.uint8)
        nbytes = values.shape[-1]
        idx, t = self._expand(tids, addrs, nbytes, what)
        self.stats["writes"] += 1
        if idx.size == 0:
            return
        self._check_write(idx, t, what)
        self.data[idx] = values.reshape(-1)
        self.init[idx] = True
        self.w_epoch[idx] = self.epoch
        self.w_tid[idx] = t

    # cp.async.cg.shared.global [dst], [src], 16, src_size
    def cp_async(self, tids, dsts, data, what="cp.async"):
        idx, t = self._expand(tids, dsts, 16, what)
        self.stats["copies"] += 1
        if idx.size == 0:
            return
        self._check_write(idx, t, what)  # also: the destination must not be in flight
        self.inflight[idx] += 1
        self.pending.append(dict(tid=np.asarray(tids, np.int64).reshape(-1), dst=np.asarray(dsts, np.int64).reshape(-1),
                                 data=np.asarray(data, np.uint8).reshape(-1, 16),
                                 group=np.full(np.asarray(tids).size, -1, np.int64)))

    def commit(self, tids):
        tids = np.asarray(tids, np.int64)
        for rec in self.pending:
            mine = np.isin(rec["tid"], tids) & (rec["group"] == -1)
            rec["group"][mine] = self.committed[rec["tid"][mine]]
        self.committed[tids] += 1

    def wait_group(self, tids, n):
        tids = np.asarray(tids, np.int64)
        keep = []
        for rec in self.pending:
            limit = self.committed[rec["tid"]] - n
            done = np.isin(rec["tid"], tids) & (rec["group"] != -1) & (rec["group"] < limit)
            if done.any():
                idx = (rec["dst"][done][:, None] + np.arange(16)).reshape(-1)
                t = np.repeat(rec["tid"][done], 16)
                self.inflight[idx] -= 1
                self.data[idx] = rec["data"][done].reshape(-1)
                self.init[idx] = True
                # the copy's write counts as this thread's write in the current barrier interval
                self.w_epoch[idx] = self.epoch
                self.w_tid[idx] = t
            if (~done).any():
                keep.append({k: v[~done] for k, v in rec.items()})
        self.pending = keep

    def syncthreads(self, active):
        if not np.all(active):
            raise EmuError("__syncthreads reached by only part of the CTA")
        self.epoch += 1
        self.stats["barriers"] += 1

    def assert_no_copies_in_flight(self):
        if any(rec["tid"].size for rec in self.pending):
            raise EmuError("CTA exits with cp.async copies still in flight")


# ------------------------------------------------------------------------- the GEMM kernel

K_THREADS = 128
K_TILE_N = 128
K_CHUNK = 128
K_STAGES = 3
K_XROW = K_CHUNK + 8
K_LUT_BYTES = 256 * 32 * 4
NVFP4_BLOCK, MXFP4_BLOCK = 16, 32

PLANTED_BUGS = {
    "a_perm": "A side reads K elements 4*quad + 16*step (the un-permuted order) instead of 32*quad + 4*step",
    "b_swap": "B side swaps the two bytes of a half word (b0 <-> b1)",
    "a_reg_order": "A fragment registers 1 and 2 swapped (a = {top.x, top.y, bottom.x, bottom.y})",
    "nvfp4_one_scale": "NVFP4: words 2,3 use the first scale code (elements 16-31 mis-scaled)",
    "no_chunk_barrier": "the __syncthreads after cp_async_wait in the chunk loop is missing",
    "no_pass_barrier": "the __syncthreads before the prologue of a pass is missing",
    "wait_too_few": "cp_async_wait<kStages - 1> instead of <kStages - 2>",
    "no_zero_fill": "invalid activation pieces are skipped instead of zero-filled",
    "half_segment_full": "the K tail half segment (K % 32 == 16) is loaded as a full 16-byte segment",
    "pair_store_only": "the k_splits == 1 store writes bf16 pairs only (drops the odd tail column)",
    "finalize_skip_tail": "the finalize kernel does not write rows past offs[-1]",
    "store_row_no_guard": "the store forgets `row >= row_end` (writes rows of the next group)",
    "mx_scale_index": "MXFP4 scale code read at element / 16",
}


class Params:
    pass


def cdiv(a, b):
    return (a + b - 1) // b


def fp4_gemm_smem_bytes(m_tiles):
    return K_LUT_BYTES + K_STAGES * 16 * m_tiles * K_XROW * 2


def mma_m16n8k16_bf16(d, a, b0, b1, rounding="rn"):
    """One warp-wide mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32 for W warps at once.
    d: [W, 32, 4] float32, a: [W, 32, 4] u32, b0/b1: [W, 32] u32. Fragment layouts from the
    PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type")."""
    W = d.shape[0]
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    A = np.full((W, 16, 16), np.nan)
    B = np.full((W, 16, 8), np.nan)
    for i in range(8):  # a_i lives in register i // 2, half i % 2
        row = np.where((i < 2) | ((i >= 4) & (i < 6)), g, g + 8)
        col = 2 * t + (i & 1) + (8 if i >= 4 else 0)
        vals = bf16_bits_to_f32((a[:, :, i // 2] >> (16 * (i % 2))) & 0xFFFF).astype(np.float64)
        A[:, row, col] = vals
    for i in range(4):  # b_i in register b0 (i < 2) / b1 (i >= 2)
        row = 2 * t + (i & 1) + (8 if i >= 2 else 0)
        reg = b0 if i < 2 else b1
        B[:, row, g] = bf16_bits_to_f32((reg >> (16 * (i % 2))) & 0xFFFF).astype(np.float64)
    assert not np.isnan(A).any() and not np.isnan(B).any(), "fragment layout left a hole"
    D = A @ B  # exact products; float64 sum of 16 terms
    out = d.copy()
    for i in range(4):
        row = np.where(i < 2, g, g + 8)
        col = 2 * t + (i & 1)
        total = d[:, :, i].astype(np.float64) + D[:, row, col]
        if rounding == "rn":
            out[:, :, i] = total.astype(np.float32)
        else:  # round toward zero (a pessimistic tensor-core model)
            r = total.astype(np.float32)
            too_big = np.abs(r.astype(np.float64)) > np.abs(total)
            r = np.where(too_big, np.nextafter(r, np.float32(0)), r)
            out[:, :, i] = r
    return out


def scale_pair(code, nvfp4):
    code = np.asarray(code, np.uint32)
    if nvfp4:
        value = fp8_e4m3_to_float(code & 0xFF)
        bits = pack_pair_bf16(value, value) & 0xFFFF
    else:
        bits = (code & 0xFF) << 7
    return (bits | (bits << 16)).astype(np.uint32)


def gemm_cta(P, M_TILES, bx, by, mem, bugs, rounding, cta_id):
    ROWS = 16 * M_TILES
    smem = Smem(fp4_gemm_smem_bytes(M_TILES), K_THREADS)
    LUT = 0
    XS = K_LUT_BYTES
    tid = np.arange(K_THREADS)
    allthreads = np.ones(K_THREADS, bool)
    x, w, ws, wg, offs, y, partial = (mem[k] for k in ("x", "w", "w_scales", "w_global", "offs", "y", "partial"))

    n_tile, split = bx % P.n_tiles, bx // P.n_tiles
    expert = by
    def i32(buf, i):
        return int(buf.load([4 * i], 4, "offs load").view("<i4")[0, 0])
    row_begin = 0 if expert == 0 else i32(offs, expert - 1)
    row_end = i32(offs, expert)
    row_begin = 0 if row_begin < 0 else (P.tokens if row_begin > P.tokens else row_begin)
    row_end = row_begin if row_end < row_begin else (P.tokens if row_end > P.tokens else row_end)
    if row_begin == row_end:
        return 0  # uniform early return

    warp, lane = tid // 32, tid % 32
    group_row, quad = lane // 4, lane % 4
    total_chunks = cdiv(P.k, K_CHUNK)
    chunk_begin = split * P.chunks_per_split
    chunk_end = min(chunk_begin + P.chunks_per_split, total_chunks)
    chunks = chunk_end - chunk_begin if chunk_end > chunk_begin else 0
    scales_per_row = P.k // (NVFP4_BLOCK if P.nvfp4 else MXFP4_BLOCK)

    # LUT: index = threadIdx.x + 128 * iteration
    for it in range(256 * 32 // K_THREADS):
        index = tid + K_THREADS * it
        byte = index // 32
        val = pack_pair_bf16(e2m1_to_float(byte & 0xF), e2m1_to_float(byte >> 4))
        smem.write(tid, LUT + 4 * index, u32_to_bytes(val), "LUT write")

    n_base = n_tile * K_TILE_N + warp * 32 + group_row
    first_row = np.int64(expert) * P.n + n_base
    weight_row0 = first_row * (P.k // 2)
    scale_row0 = first_row * scales_per_row

    def load_segments(chunk):
        element = chunk * K_CHUNK + 32 * quad
        valid = P.k - element
        words = np.zeros((K_THREADS, 4, 4), np.uint32)
        codes = np.zeros((K_THREADS, 4), np.uint32)
        for j in range(4):
            active = ~((n_base + 8 * j >= P.n) | (valid <= 0))
            source = weight_row0 + np.int64(8 * j) * (P.k // 2) + element // 2
            scale_row = scale_row0 + 8 * j * scales_per_row
            full_ok = (valid >= 32) | ("half_segment_full" in bugs)
            vec16 = active & full_ok & P.rows_16b_aligned
            if vec16.any():
                words[vec16, j] = bytes_to_u32(w.load(source[vec16], 16, "weight uint4 __ldcs"))
            two = active & ~vec16
            if two.any():
                words[two, j, 0:2] = bytes_to_u32(w.load(source[two], 8, "weight uint2 __ldcs (low)"))
                hi = two & full_ok
                if hi.any():
                    words[hi, j, 2:4] = bytes_to_u32(w.load(source[hi] + 8, 8, "weight uint2 __ldcs (high)"))
            if active.any():
                if P.nvfp4:
                    c0 = ws.load(scale_row[active] + element[active] // NVFP4_BLOCK, 1, "scale code 0")[:, 0]
                    c = c0.astype(np.uint32)
                    hi = (valid[active] >= 32)
                    if hi.any():
                        c1 = ws.load((scale_row[active] + element[active] // NVFP4_BLOCK + 1)[hi], 1, "scale code 1")[:, 0]
                        c[hi] |= c1.astype(np.uint32) << 8
                    codes[active, j] = c
                else:
                    div = NVFP4_BLOCK if "mx_scale_index" in bugs else MXFP4_BLOCK
                    codes[active, j] = ws.load(scale_row[active] + element[active] // div, 1, "mx scale code")[:, 0]
        return words, codes

    global_scale = np.float32(wg.load([4 * expert], 4, "w_global load").view("<f4")[0, 0])
    acc_rows_written = 0
    for pass_begin in range(row_begin, row_end, ROWS):
        pass_rows = min(ROWS, row_end - pass_begin)
        m_tiles = (pass_rows + 15) // 16

        def load_x(chunk_index):
            if chunk_index < chunks:
                stage_el = (chunk_index % K_STAGES) * ROWS * K_XROW
                element0 = (chunk_begin + chunk_index) * K_CHUNK
                for it in range(cdiv(ROWS * (K_CHUNK // 8), K_THREADS)):
                    piece = tid + K_THREADS * it
                    live = piece < ROWS * (K_CHUNK // 8)
                    row = piece // (K_CHUNK // 8)
                    column = (piece % (K_CHUNK // 8)) * 8
                    valid = (row < pass_rows) & (element0 + column < P.k) & live
                    src = np.where(valid, (np.int64(pass_begin) + row) * P.x_stride_row + element0 + column, 0) * 2
                    data = np.zeros((K_THREADS, 16), np.uint8)
                    if valid.any():
                        data[valid] = x.load(src[valid], 16, "cp.async global source")
                    # src-size 0 still names params.x: it must be 16-byte aligned for cp-size 16
                    if (~valid & live).any() and (x.base % 16) != 0:
                        raise EmuError("cp.async zero-fill source params.x is not 16-byte aligned")
                    dst = XS + (stage_el + row * K_XROW + column) * 2
                    issue = live if "no_zero_fill" not in bugs else (live & valid)
                    smem.cp_async(tid[issue], dst[issue], data[issue], "cp.async activation stage")
            smem.commit(tid)

        acc = np.zeros((K_THREADS, M_TILES, 4, 4), np.float32)
        if "no_pass_barrier" not in bugs:
            smem.syncthreads(allthreads)
        for s in range(K_STAGES - 1):
            load_x(s)
        current = load_segments(chunk_begin)
        nxt = None
        for chunk in range(chunks):
            smem.wait_group(tid, K_STAGES - 1 if "wait_too_few" in bugs else K_STAGES - 2)
            if "no_chunk_barrier" not in bugs:
                smem.syncthreads(allthreads)
            load_x(chunk + K_STAGES - 1)
            if chunk + 1 < chunks:
                nxt = load_segments(chunk_begin + chunk + 1)
            stage_el = (chunk % K_STAGES) * ROWS * K_XROW
            cw, cc = current
            scales = np.zeros((K_THREADS, 4, 2), np.uint32)
            for j in range(4):
                scales[:, j, 0] = scale_pair(cc[:, j] & 0xFF, P.nvfp4)
                scales[:, j, 1] = scale_pair(cc[:, j] >> 8, True) if P.nvfp4 else scales[:, j, 0]
            for word_index in range(4):
                words = cw[:, :, word_index]
                if "nvfp4_one_scale" in bugs:
                    scale_of_word = scales[:, :, 0]
                else:
                    scale_of_word = scales[:, :, 0] if word_index < 2 else scales[:, :, 1]
                for half_word in range(2):
                    step = 2 * word_index + half_word
                    a = np.zeros((K_THREADS, M_TILES, 4), np.uint32)
                    for m in range(M_TILES):
                        if m < m_tiles:
                            kcol = (4 * quad + 16 * step) if "a_perm" in bugs else (32 * quad + 4 * step)
                            row0 = stage_el + (m * 16 + group_row) * K_XROW + kcol
                            top = bytes_to_u32(smem.read(tid, XS + row0 * 2, 8, "A top uint2"))
                            bottom = bytes_to_u32(smem.read(tid, XS + (row0 + 8 * K_XROW) * 2, 8, "A bottom uint2"))
                            if "a_reg_order" in bugs:
                                a[:, m] = np.stack([top[:, 0], top[:, 1], bottom[:, 0], bottom[:, 1]], 1)
                            else:
                                a[:, m] = np.stack([top[:, 0], bottom[:, 0], top[:, 1], bottom[:, 1]], 1)
                    for j in range(4):
                        s0, s1 = 16 * half_word, 16 * half_word + 8
                        if "b_swap" in bugs:
                            s0, s1 = s1, s0
                        byte0 = (words[:, j] >> s0) & 0xFF
                        byte1 = (words[:, j] >> s1) & 0xFF
                        l0 = bytes_to_u32(smem.read(tid, LUT + 4 * (byte0 * 32 + lane), 4, "LUT read"))[:, 0]
                        l1 = bytes_to_u32(smem.read(tid, LUT + 4 * (byte1 * 32 + lane), 4, "LUT read"))[:, 0]
                        b0 = hmul2_bf16(l0, scale_of_word[:, j])
                        b1 = hmul2_bf16(l1, scale_of_word[:, j])
                        for m in range(M_TILES):
                            if m < m_tiles:
                                d = acc[:, m, j].reshape(4, 32, 4)
                                acc[:, m, j] = mma_m16n8k16_bf16(d, a[:, m].reshape(4, 32, 4), b0.reshape(4, 32),
                                                                 b1.reshape(4, 32), rounding).reshape(128, 4)
            if chunk + 1 < chunks:
                current = nxt
        smem.wait_group(tid, 0)

        # store
        for m in range(M_TILES):
            if m >= m_tiles:
                continue
            for half in range(2):
                row = pass_begin + m * 16 + group_row + 8 * half
                rmask = (row < row_end) if "store_row_no_guard" not in bugs else (row < P.tokens)
                for j in range(4):
                    column = n_tile * K_TILE_N + warp * 32 + 8 * j + 2 * quad
                    v0 = (acc[:, m, j, 2 * half] * global_scale).astype(np.float32)
                    v1 = (acc[:, m, j, 2 * half + 1] * global_scale).astype(np.float32)
                    if P.k_splits == 1:
                        target = (row.astype(np.int64) * P.n + column) * 2
                        if "pair_store_only" in bugs:
                            pair = rmask & (column + 1 < P.n)
                            single0 = np.zeros_like(pair)
                            single1 = np.zeros_like(pair)
                        else:
                            pair = rmask & (column + 1 < P.n) & (P.n % 2 == 0)
                            single0 = rmask & ~pair & (column < P.n)
                            single1 = rmask & ~pair & (column + 1 < P.n)
                        if pair.any():
                            bits = f32_to_bf16_bits(v0[pair]) | (f32_to_bf16_bits(v1[pair]) << 16)
                            y.store(target[pair], u32_to_bytes(bits), cta_id, "y bf16x2 store")
                        if single0.any():
                            y.store(target[single0], u32_to_bytes(f32_to_bf16_bits(v0[single0]))[:, :2], cta_id,
                                    "y bf16 store")
                        if single1.any():
                            y.store(target[single1] + 2, u32_to_bytes(f32_to_bf16_bits(v1[single1]))[:, :2], cta_id,
                                    "y bf16 store (+1)")
                    else:
                        target = ((np.int64(split) * P.tokens + row) * P.n + column) * 4
                        c0 = rmask & (column < P.n)
                        c1 = rmask & (column + 1 < P.n)
                        if c0.any():
                            partial.store(target[c0], u32_to_bytes(f32_bits(v0[c0])), cta_id, "partial store")
                        if c1.any():
                            partial.store(target[c1] + 4, u32_to_bytes(f32_bits(v1[c1])), cta_id, "partial store (+1)")
        acc_rows_written += pass_rows
    smem.assert_no_copies_in_flight()
    return acc_rows_written


def finalize_kernel(P, mem, grid, block, bugs):
    offs, y, partial = mem["offs"], mem["y"], mem["partial"]
    total = P.tokens * P.n
    last_row = int(offs.load([4 * (P.num_experts - 1)], 4, "finalize offs").view("<i4")[0, 0])
    last_row = 0 if last_row < 0 else (P.tokens if last_row > P.tokens else last_row)
    base = np.arange(grid * block, dtype=np.int64)  # blockIdx.x * blockDim.x + threadIdx.x
    stride = grid * block
    index = base.copy()
    visits = np.zeros(total, np.int64)
    while True:
        live = index < total
        if not live.any():
            break
        idx = index[live]
        visits[idx] += 1
        s = np.zeros(idx.size, np.float32)
        in_group = (idx // P.n) < last_row
        if "finalize_skip_tail" in bugs:
            idx, s, in_group = idx[in_group], s[in_group], in_group[in_group]
        for split in range(P.k_splits):
            if in_group.any():
                vals = partial.load((np.int64(split) * total + idx[in_group]) * 4, 4, "finalize partial load")
                s[in_group] = (s[in_group] + vals.view("<f4")[:, 0]).astype(np.float32)
        y.store(idx * 2, u32_to_bytes(f32_to_bf16_bits(s))[:, :2], -1000, "finalize y store")
        index = index + stride
    if (visits != 1).any():
        raise EmuError("finalize: some index visited != 1 times")


def torch_bytes(t):
    """Bytes of a tensor's extent (from data_ptr) and its base address."""
    if t.numel() == 0:
        return np.zeros(0, np.uint8), t.data_ptr()
    extent = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    flat = torch.as_strided(t, (extent,), (1,), t.storage_offset())
    if flat.dtype.is_floating_point and flat.element_size() == 1:
        flat = flat.view(torch.uint8)
    return flat.contiguous().view(torch.uint8).numpy().copy(), t.data_ptr()


def plan_splits(T, K, N, E, sm_count, ctas_per_sm, force_splits=None):
    """fp4_grouped_gemm.cu lines 70-88 (Python // on non-negative ints == C++ /)."""
    n_tiles = cdiv(N, K_TILE_N)
    total_chunks = cdiv(K, K_CHUNK)
    single_tile = T <= 16
    units = E * n_tiles
    occ = ctas_per_sm[1 if single_tile else 4]
    target = sm_count * max(2, occ)
    k_splits = 1 if units >= target or T > 64 else min(cdiv(target, units), 32)
    if force_splits is not None:
        k_splits = force_splits
    k_splits = max(1, min(k_splits, total_chunks))
    chunks_per_split = (total_chunks + k_splits - 1) // k_splits
    ks = (total_chunks + chunks_per_split - 1) // chunks_per_split  # K == 0 returns before this
    ks = max(1, ks)
    return n_tiles, ks, chunks_per_split, single_tile


# Occupancy from cuobjdump -res-usage of the built sm_90a code: M_TILES=1: 141 regs
# (3 CTAs/SM by registers, 4 by 46.8 KB smem) -> 3; M_TILES=4: 248 regs / 86 KB -> 2.
H200_CTAS_PER_SM = {1: 3, 4: 2}


def fp4_grouped_gemm_emulated(x_in, w_in, ws_in, wg_in, offs_in, fmt, *, sm_count=132, ctas_per_sm=None,
                              force_splits=None, bugs=frozenset(), rounding="rn", info=None):
    ctas_per_sm = ctas_per_sm or H200_CTAS_PER_SM
    nvfp4 = fmt == "nvfp4"
    T, K = x_in.shape
    E, N, _ = w_in.shape
    assert K % (16 if nvfp4 else 32) == 0
    x_usable = x_in.stride(1) == 1 and (x_in.stride(0) * 2) % 16 == 0 and x_in.data_ptr() % 16 == 0
    # The launcher clones (a fresh, aligned allocation) what it cannot read in place.
    x = x_in if x_usable else x_in.clone(memory_format=torch.contiguous_format)
    w = w_in if w_in.is_contiguous() and w_in.data_ptr() % 16 == 0 else w_in.clone(memory_format=torch.contiguous_format)
    ws = ws_in.contiguous()
    wg, ends = wg_in.contiguous(), offs_in.contiguous()
    P = Params()
    P.x_stride_row = x.stride(0)
    P.tokens, P.k, P.n, P.num_experts = T, K, N, E
    P.nvfp4 = nvfp4
    P.rows_16b_aligned = (K // 2) % 16 == 0
    if T == 0 or N == 0 or K == 0:
        return torch.zeros(T, N, dtype=torch.bfloat16)
    P.n_tiles, P.k_splits, P.chunks_per_split, single_tile = plan_splits(T, K, N, E, sm_count, ctas_per_sm,
                                                                          force_splits)
    M_TILES = 1 if single_tile else 4
    mem = {}
    xb, xbase = torch_bytes(x)
    mem["x"] = GBuf("x", xb, xbase, readonly=True)
    for name, t in (("w", w), ("w_scales", ws), ("w_global", wg), ("offs", ends)):
        b, base = torch_bytes(t)
        mem[name] = GBuf(name, b, base, readonly=True)
    if P.k_splits == 1:
        mem["y"] = GBuf("y", np.zeros(T * N * 2, np.uint8), 0x7f0000000000, init=True)
        mem["partial"] = None
    else:
        mem["y"] = GBuf("y", np.full(T * N * 2, 0xFF, np.uint8), 0x7f0000000000, init=False)
        mem["partial"] = GBuf("partial", np.full(P.k_splits * T * N * 4, 0xFF, np.uint8), 0x7f1000000000, init=False)
    grid = (P.n_tiles * P.k_splits, E)
    ctas_run = 0
    for by in range(grid[1]):
        for bx in range(grid[0]):
            if gemm_cta(P, M_TILES, bx, by, mem, bugs, rounding, cta_id=by * grid[0] + bx):
                ctas_run += 1
    if P.k_splits > 1:
        mem["y"].writer[:] = -1  # a new kernel (stream order)
        blocks = min(cdiv(T * N, 256), sm_count * 32)
        finalize_kernel(P, mem, blocks, 256, bugs)
    if not mem["y"].init.all():
        raise EmuError("y has elements no kernel wrote (torch.empty garbage reaches the caller)")
    if info is not None and P.k_splits > 1:
        parts = mem["partial"].data.view("<f4").reshape(P.k_splits, T, N).astype(np.float64)
        last = min(max(int(ends[-1]), 0), T)
        pre = np.zeros((T, N))
        pre[:last] = parts[:, :last].sum(0)
        info["y_fp32_sum"] = torch.from_numpy(pre)
    if info is not None:
        info.update(M_TILES=M_TILES, k_splits=P.k_splits, chunks_per_split=P.chunks_per_split, n_tiles=P.n_tiles,
                    ctas_run=ctas_run, grid=grid)
    y_bits = mem["y"].data.view("<u2").astype(np.int16)
    return torch.from_numpy(y_bits.copy()).view(torch.bfloat16).reshape(T, N)


# ------------------------------------------------------------------------- GEMM tests

def make_experts(num_experts, n, k, fmt, gen):
    parts = [quantize_fp4_reference(torch.randn(n, k, generator=gen) * (0.5 + e % 3), fmt) for e in range(num_experts)]
    w = torch.stack([p[0] for p in parts])
    scales = torch.stack([p[1] for p in parts])
    global_scales = torch.stack([p[2] for p in parts]).float()
    return w, scales, global_scales


def check_gemm(group_sizes, n, k, fmt, *, extra_rows=0, seed=0, verbose=True, x_override=None, **kw):
    gen = torch.Generator().manual_seed(seed)
    E = len(group_sizes)
    w, scales, gs = make_experts(E, n, k, fmt, gen)
    T = sum(group_sizes) + extra_rows
    x = torch.randn(T, k, generator=gen).bfloat16() if x_override is None else x_override(T, k, gen)
    offs = torch.tensor(group_sizes, dtype=torch.int32).cumsum(0).to(torch.int32)
    info = {}
    t0 = time.time()
    y = fp4_grouped_gemm_emulated(x, w, scales, gs, offs, fmt, info=info, **kw)
    reference = fp4_grouped_gemm_reference(x, w, scales, gs, offs, fmt, out_dtype=torch.float64)
    baseline = fp4_grouped_gemm_reference(x, w, scales, gs, offs, fmt, compute_dtype=torch.float32)
    assert_close_to_reference(y, reference, baseline, accumulated_terms=k, name="y")
    assert torch.all(y[sum(group_sizes):] == 0), "rows past offs[-1] must be zero"
    bf16_ref = reference.to(torch.bfloat16)
    mism = int((y.view(torch.int16) != bf16_ref.view(torch.int16)).sum()) if y.numel() else 0
    ulp = ((y.double() - bf16_ref.double()).abs() /
           (bf16_ref.double().abs() * 2.0 ** -7).clamp(min=1e-30)).max().item() if y.numel() else 0.0
    info["bf16_mismatch"] = mism
    info["max_ulp"] = ulp
    if "y_fp32_sum" in info and y.numel():
        scale0 = max(reference.abs().max().item(), 1e-30)
        info["fp32_rel_err"] = (info.pop("y_fp32_sum") - reference).abs().max().item() / scale0
        # fp32 accumulation of K exact products: a few fp32 ulps of the largest output
        assert info["fp32_rel_err"] < 4 * math.sqrt(k) * 2.0 ** -24, info["fp32_rel_err"]
    err = (y.double() - reference).abs().max().item() if y.numel() else 0.0
    berr = (baseline.double() - reference).abs().max().item() if y.numel() else 0.0
    scale = reference.abs().max().item() if y.numel() else 0.0
    if verbose:
        print(f"  OK {fmt} groups={group_sizes if len(group_sizes) <= 8 else f'{E} groups, T={T}'} "
              f"extra={extra_rows} N={n} K={k} M_TILES={info.get('M_TILES')} k_splits={info.get('k_splits')} "
              f"cps={info.get('chunks_per_split')} ctas={info.get('ctas_run')} max|err|={err:.3e} "
              f"baseline={berr:.3e} max|ref|={scale:.3g} bf16!=rn(ref): {info['bf16_mismatch']}/{y.numel()} "
              f"max {info['max_ulp']:.2f} ulp"
              + (f" fp32 pre-rounding rel err {info['fp32_rel_err']:.1e}" if "fp32_rel_err" in info else "")
              + f" ({time.time() - t0:.1f}s)", flush=True)
    return dict(err=err, baseline=berr, scale=scale, cfg=(fmt, len(group_sizes), n, k), **info)


def gemm_suite(quick=False):
    results = []
    ks_all = [32, 96, 160, 208, 256, 1056]
    ns_all = [24, 40, 96, 200]
    for fmt in ("nvfp4", "mxfp4"):
        # group patterns of the tests (N=96, K=256, 3 rows past offs[-1]); splits from the H200 plan and forced 1
        for sizes in ([5, 0, 9, 1], [0, 0, 0, 0], [17]):
            for fs in (None, 1):
                results.append(check_gemm(sizes, 96, 256, fmt, extra_rows=3, force_splits=fs))
        # 256 groups of 0-3 rows
        g = torch.Generator().manual_seed(1)
        sizes = torch.randint(0, 4, (256,), generator=g).tolist()
        results.append(check_gemm(sizes, 64 if quick else 40, 128, fmt, extra_rows=2))
        # prefill groups (M_TILES = 4, several passes)
        for fs in (None, 1):
            results.append(check_gemm([150, 70], 72, 256, fmt, extra_rows=5, force_splits=fs))
        # K x N grid
        for k in ks_all:
            if k % (16 if fmt == "nvfp4" else 32):
                continue
            for n in ns_all:
                for fs in (None, 1):
                    results.append(check_gemm([3, 8], n, k, fmt, extra_rows=2, force_splits=fs, seed=k + n))
        # M_TILES = 4 with odd K tail / odd N
        k_odd = 208 if fmt == "nvfp4" else 160
        results.append(check_gemm([20, 0, 45], 200, k_odd, fmt, extra_rows=1))
        results.append(check_gemm([20, 0, 45], 24, 1056, fmt, extra_rows=1, force_splits=1))
        # many splits with a partial last split (K=1056: 9 chunks, 4 splits -> 3,3,3 ; 5 -> 2,2,2,2,1)
        for fs in (4, 5, 32):
            results.append(check_gemm([2, 5], 40, 1056, fmt, force_splits=fs))
    # a pessimistic tensor-core accumulation (round toward zero) still within tolerance
    results.append(check_gemm([5, 0, 9, 1], 96, 1056, "nvfp4", extra_rows=3, rounding="rz"))
    results.append(check_gemm([150, 70], 40, 1056, "mxfp4", rounding="rz", force_splits=1))
    return results


def gemm_strided_x_checks():
    """x with a row stride (usable, 16-byte aligned) and x views that are misaligned."""
    print("strided / offset x:")
    gen = torch.Generator().manual_seed(3)
    w, s, g = make_experts(2, 40, 96, "nvfp4", gen)
    big = torch.randn(12, 96 + 24, generator=gen).bfloat16()
    x = big[:11, 8:8 + 96]  # stride 120 elements = 240 bytes (16-aligned), offset 16 bytes
    offs = torch.tensor([4, 9], dtype=torch.int32)
    y = fp4_grouped_gemm_emulated(x, w, s, g, offs, "nvfp4")
    ref = fp4_grouped_gemm_reference(x, w, s, g, offs, "nvfp4", out_dtype=torch.float64)
    base = fp4_grouped_gemm_reference(x, w, s, g, offs, "nvfp4", compute_dtype=torch.float32)
    assert_close_to_reference(y, ref, base, accumulated_terms=96)
    print("  OK strided usable x (stride 120, +16 B offset)")
    # T == 1, column offset 4 elements (8 bytes): contiguous view, so .contiguous() returns it unchanged
    xs = big[:1, 4:4 + 96]
    print(f"  x = big[:1, 4:100]: is_contiguous={xs.is_contiguous()}, data_ptr % 16 = {xs.data_ptr() % 16}, "
          f".contiguous() is the same memory: {xs.contiguous().data_ptr() == xs.data_ptr()}")
    try:
        fp4_grouped_gemm_emulated(xs, w, s, g, torch.tensor([1, 1], dtype=torch.int32), "nvfp4")
        print("  (no error)")
    except EmuError as e:
        print(f"  BUG reproduced: {e}")
    # w as a contiguous view whose storage offset is 8 bytes (e.g. carved out of a flat buffer)
    def offset_view(t, offset):
        raw = torch.zeros(offset + t.numel(), dtype=torch.uint8)
        raw[offset:] = t.reshape(-1)
        return raw[offset:].view(t.shape)
    for k, fmt in ((208, "nvfp4"), (96, "nvfp4"), (128, "mxfp4")):
        w2, s2, g2 = make_experts(1, 40, k, fmt, gen)
        wmis = offset_view(w2, 8)
        try:
            fp4_grouped_gemm_emulated(torch.randn(3, k, generator=gen).bfloat16(), wmis, s2, g2,
                                      torch.tensor([3], dtype=torch.int32), fmt)
            print(f"  w contiguous view at +8 B, {fmt} K={k} (rows_16b_aligned={(k // 2) % 16 == 0}): OK")
        except EmuError as e:
            print(f"  BUG reproduced (w contiguous view at +8 B, {fmt} K={k}): {e}")


def gemm_invalid_offs_checks(trials=60):
    """Unchecked offs on the device (HELIX_CHECK_INPUTS unset): every access must stay in bounds
    and no uninitialised partial may be read. Overlapping groups (non-monotonic offs) make CTAs
    write the same rows: recorded, not an error (garbage in, garbage out), but reported."""
    global CONFLICTS
    print("invalid offs (no HELIX_CHECK_INPUTS):")
    gen = torch.Generator().manual_seed(5)
    rng = np.random.default_rng(5)
    w, s, g = make_experts(4, 40, 160, "mxfp4", gen)
    overlap_runs = tail_nonzero = 0
    for trial in range(trials):
        T = int(rng.integers(1, 40))
        x = torch.randn(T, 160, generator=gen).bfloat16()
        choices = [-2**31, -5, -1, 0, 1, T // 2, T - 1, T, T + 1, T + 17, 2**31 - 1]
        offs = [int(rng.choice(choices)) if rng.random() < 0.6 else int(rng.integers(-3, T + 4)) for _ in range(4)]
        for fs in (None, 1):
            CONFLICTS = []
            try:
                y = fp4_grouped_gemm_emulated(x, w, s, g, torch.tensor(offs, dtype=torch.int32), "mxfp4",
                                              force_splits=fs)
            finally:
                conflicts, CONFLICTS = CONFLICTS, None
            last = min(max(offs[-1], 0), T)
            tail_nonzero += bool((y[last:] != 0).any())
            overlap_runs += bool(conflicts)
    print(f"  {trials} random invalid offs x (planned split, k_splits=1): all accesses in bounds, no uninitialised "
          f"partial read; {overlap_runs} runs had overlapping groups "
          f"(CTAs writing the same rows: nondeterministic values, in bounds); {tail_nonzero} runs had nonzero rows past "
          f"clamp(offs[-1]) (k_splits == 1 path only: a non-monotonic group can reach past offs[-1])")


def random_fuzz(trials=40, seed=11):
    print("random valid configurations:")
    rng = np.random.default_rng(seed)
    res = []
    for trial in range(trials):
        fmt = "nvfp4" if trial % 2 == 0 else "mxfp4"
        blk = 16 if fmt == "nvfp4" else 32
        k = int(rng.integers(1, 24)) * blk
        n = int(rng.integers(1, 300))
        E = int(rng.integers(1, 6))
        big = rng.random() < 0.3
        sizes = [int(v) for v in rng.integers(0, 90 if big else 6, E)]
        extra = int(rng.integers(0, 4))
        fs = [None, 1, int(rng.integers(2, 12))][trial % 3]
        res.append(check_gemm(sizes, n, k, fmt, extra_rows=extra, force_splits=fs, seed=1000 + trial))
    return res


def gemm_k0_check():
    print("K = 0:")
    x = torch.zeros(4, 0, dtype=torch.bfloat16)
    w = torch.zeros(2, 40, 0, dtype=torch.uint8)
    ws = torch.zeros(2, 40, 0, dtype=torch.uint8)
    y = fp4_grouped_gemm_emulated(x, w, ws, torch.ones(2), torch.tensor([1, 3], dtype=torch.int32), "mxfp4")
    assert y.shape == (4, 40) and not y.any().item()
    print("  returns zeros before planning (no division by zero)")


def planted_bug_checks():
    print("planted bugs:")
    cases = {
        "a_perm": ([5, 0, 9, 1], 96, 256, "nvfp4", {}),
        "b_swap": ([5, 0, 9, 1], 96, 256, "mxfp4", {}),
        "a_reg_order": ([5, 0, 9, 1], 96, 256, "nvfp4", {}),
        "nvfp4_one_scale": ([5, 0, 9, 1], 96, 256, "nvfp4", {}),
        "no_chunk_barrier": ([5, 0, 9, 1], 96, 1056, "nvfp4", {"force_splits": 1}),
        "no_pass_barrier": ([150, 70], 40, 256, "mxfp4", {}),
        "wait_too_few": ([5, 9], 40, 1056, "mxfp4", {"force_splits": 1}),
        "no_zero_fill": ([5, 9], 40, 256, "mxfp4", {}),
        "half_segment_full": ([2, 5], 24, 208, "nvfp4", {}),
        "pair_store_only": ([3, 8], 41, 256, "mxfp4", {"force_splits": 1}),
        "finalize_skip_tail": ([3, 8], 40, 256, "mxfp4", {"extra_rows": 3}),
        "store_row_no_guard": ([3, 8], 40, 256, "nvfp4", {"force_splits": 1}),
        "mx_scale_index": ([3, 8], 40, 256, "mxfp4", {}),
    }
    caught = {}
    for bug, (sizes, n, k, fmt, kw) in cases.items():
        kw = dict(kw)
        extra = kw.pop("extra_rows", 0)
        try:
            check_gemm(sizes, n, k, fmt, extra_rows=extra, bugs={bug}, verbose=False, **kw)
            caught[bug] = "NOT CAUGHT"
        except EmuError as e:
            caught[bug] = f"caught by the memory model: {e}"
        except AssertionError as e:
            caught[bug] = f"caught by the comparison: {str(e).splitlines()[0][:150]}"
        print(f"  {bug:20s} {caught[bug]}")
    return caught


# ------------------------------------------------------------------------- quantize / dequantize

def float_to_e2m1(x):
    """helix/fp4.h float_to_e2m1."""
    x = np.asarray(x, np.float32)
    a = np.abs(x)
    code = np.select([~(a > 0.25), a < 0.75, a <= 1.25, a < 1.75, a <= 2.5, a < 3.5, a <= 5.0],
                     [0, 1, 2, 3, 4, 5, 6], 7).astype(np.uint32)
    return np.where((code != 0) & (x < 0), code | 8, code).astype(np.uint32)


def e4m3_from_float(value):
    value = np.asarray(value, np.float32)
    bits = f32_bits(value).astype(np.int64)
    exponent = ((bits >> 23) & 0xFF) - 127
    steps = (value * np.float32(512)).astype(np.float32)
    whole = steps.astype(np.int64)  # static_cast<uint32_t> truncation (value > 0)
    frac = (steps - whole.astype(np.float32)).astype(np.float32)
    whole = whole + ((frac > 0.5) | ((frac == 0.5) & ((whole & 1) == 1)))
    sub = whole & 0xFF
    mantissa = (bits & 0x7FFFFF) >> 20
    rem = bits & 0xFFFFF
    mantissa = mantissa + ((rem > 0x80000) | ((rem == 0x80000) & ((mantissa & 1) == 1)))
    biased = exponent + 7
    carry = mantissa == 8
    mantissa = np.where(carry, 0, mantissa)
    biased = np.where(carry, biased + 1, biased)
    normal = ((biased << 3) | mantissa) & 0xFF
    return np.where(exponent < -6, sub, normal).astype(np.uint8)


def mxfp4_scale_code(block_amax):
    field = ((f32_bits(block_amax) >> 23) & 0xFF).astype(np.int64)
    exponent = np.where(field == 0, -127, field - 127 - 2)
    return (np.clip(exponent, -127, 127) + 127).astype(np.uint8)


def mxfp4_scale_value(code):
    code = np.asarray(code, np.uint32)
    v = bits_f32((code << 23).astype(np.uint32))
    v = np.where(code == 0, bits_f32(np.uint32(0x00400000)), v)
    return np.where(code == 0xFF, np.float32(np.nan), v).astype(np.float32)


def max_ignoring_nan(a, b):
    return np.where(b != b, a, np.where(a != a, b, np.where(a > b, a, b))).astype(np.float32)


def quantize_fp4_block(values, nvfp4, global_scale):
    """values [n, BLOCK] float32 -> (scale codes [n], packed [n, BLOCK/2])."""
    BLOCK = values.shape[1]
    amax = np.zeros(values.shape[0], np.float32)
    for i in range(BLOCK):
        amax = max_ignoring_nan(amax, np.abs(values[:, i]))
    with np.errstate(all="ignore"):
        if nvfp4:
            scale = ((amax / np.float32(6.0)).astype(np.float32) / np.float32(global_scale)).astype(np.float32)
            scale = np.where(~(scale >= np.float32(2.0 ** -9)), np.float32(2.0 ** -9), scale)
            scale = np.where(scale > 448, np.float32(448), scale).astype(np.float32)
            code = e4m3_from_float(scale)
            divisor = (fp8_e4m3_to_float(code) * np.float32(global_scale)).astype(np.float32)
        else:
            code = mxfp4_scale_code(amax)
            divisor = mxfp4_scale_value(code)
        q = float_to_e2m1((values / divisor[:, None]).astype(np.float32))
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    return code, packed


NP_DTYPE = {torch.float32: (np.float32, 4), torch.float16: (np.float16, 2), torch.bfloat16: (None, 2)}


def to_float(raw_bytes, dtype):
    if dtype == torch.float32:
        return np.ascontiguousarray(raw_bytes).view("<f4").astype(np.float32)
    if dtype == torch.float16:
        return np.ascontiguousarray(raw_bytes).view("<f2").astype(np.float32)
    return bf16_bits_to_f32(np.ascontiguousarray(raw_bytes).view("<u2").astype(np.uint32))


def from_float_bytes(f, dtype):
    f = np.ascontiguousarray(f, np.float32)
    if dtype == torch.float32:
        return f.astype("<f4").view(np.uint8).reshape(f.shape + (4,))
    if dtype == torch.float16:
        return f.astype("<f2").view(np.uint8).reshape(f.shape + (2,))
    return f32_to_bf16_bits(f).astype("<u2").view(np.uint8).reshape(f.shape + (2,))


def grid_for(work, sm_count=132, threads=256):
    return max(1, min(cdiv(work, threads), sm_count * 32))


def quantize_emulated(x_in, fmt, global_scale=None, sm_count=132):
    nvfp4 = fmt == "nvfp4"
    BLOCK = 16 if nvfp4 else 32
    x = x_in if x_in.stride(1) == 1 else x_in.contiguous()
    rows, cols = x.shape
    if rows * cols == 0:
        return None
    es = x.element_size()
    xb, xbase = torch_bytes(x)
    X = GBuf("x", xb, xbase, readonly=True)
    packed = GBuf("packed", np.zeros(rows * cols // 2, np.uint8), 0x7e0000000000, init=False)
    scales = GBuf("scales", np.zeros(rows * cols // BLOCK, np.uint8), 0x7e1000000000, init=False)
    stride = x.stride(0)
    # amax kernel (NVFP4 without a given scale)
    if nvfp4 and global_scale is None:
        grid = grid_for(rows * cols, sm_count)
        nthreads = grid * 256
        local = np.zeros(nthreads, np.float32)
        index = np.arange(nthreads, dtype=np.int64)
        while (index < rows * cols).any():
            live = index < rows * cols
            r, c = index[live] // cols, index[live] % cols
            v = to_float(X.load((r * stride + c) * es, es, "amax load"), x.dtype).reshape(-1)
            local[live] = max_ignoring_nan(local[live], np.abs(v))
            index += nthreads
        lw = local.reshape(-1, 32)  # warps
        for off in (16, 8, 4, 2, 1):
            lane = np.arange(32)
            lw = max_ignoring_nan(lw, lw[:, lane ^ off])
        amax_bits = np.uint32(0)
        for wv in lw[:, 0]:
            if wv > 0:
                amax_bits = max(amax_bits, f32_bits(wv))
        amax = bits_f32(np.uint32(amax_bits))
        g = np.float32(amax / np.float32(6.0 * 448.0)) if amax > 0 else np.float32(1.0)
    elif nvfp4:
        g = np.float32(global_scale.float().item())
    else:
        g = np.float32(1.0)
    vector = x.data_ptr() % 16 == 0 and (stride * es) % 16 == 0
    blocks_per_row = cols // BLOCK
    total = rows * blocks_per_row
    grid = grid_for(total, sm_count)
    index = np.arange(grid * 256, dtype=np.int64)
    visits = np.zeros(total, np.int64)
    while (index < total).any():
        idx = index[index < total]
        visits[idx] += 1
        row, block = idx // blocks_per_row, idx % blocks_per_row
        start = (row * stride + block * BLOCK) * es
        if vector:
            per = 16 // es
            parts = [X.load(start + i * 16, 16, "quantize 16-byte load") for i in range(BLOCK // per)]
            raw = np.concatenate(parts, axis=1)
        else:
            raw = np.concatenate([X.load(start + i * es, es, "quantize scalar load") for i in range(BLOCK)], axis=1)
        values = to_float(raw.reshape(-1), x.dtype).reshape(-1, BLOCK)
        code, pk = quantize_fp4_block(values, nvfp4, g)
        scales.store(idx, code[:, None], 0, "scales store")
        packed.store(idx * (BLOCK // 2), pk, 0, "packed ElementVector store")
        index += grid * 256
    assert (visits == 1).all()
    assert packed.init.all() and scales.init.all()
    return (torch.from_numpy(packed.data.reshape(rows, cols // 2).copy()),
            torch.from_numpy(scales.data.reshape(rows, blocks_per_row).copy()), np.float32(g))


def dequantize_emulated(packed_in, scales_in, global_scale, fmt, dtype, sm_count=132):
    nvfp4 = fmt == "nvfp4"
    BLOCK = 16 if nvfp4 else 32
    packed = packed_in if packed_in.is_contiguous() and packed_in.data_ptr() % 16 == 0 else \
        packed_in.clone(memory_format=torch.contiguous_format)
    sc = scales_in.contiguous()
    rows, cols = packed.shape[0], packed.shape[1] * 2
    pb, pbase = torch_bytes(packed)
    sb, sbase = torch_bytes(sc.view(torch.uint8) if sc.dtype != torch.uint8 else sc)
    PK = GBuf("packed", pb, pbase, readonly=True)
    SC = GBuf("scales", sb, sbase, readonly=True)
    es = torch.empty(0, dtype=dtype).element_size()
    OUT = GBuf("out", np.zeros(rows * cols * es, np.uint8), 0x7d0000000000, init=False)
    g = np.float32(global_scale.float().item()) if nvfp4 else np.float32(1.0)
    total = rows * (cols // BLOCK)
    grid = grid_for(total, sm_count)
    index = np.arange(grid * 256, dtype=np.int64)
    while (index < total).any():
        idx = index[index < total]
        code = SC.load(idx, 1, "dequant scale load")[:, 0]
        mult = (fp8_e4m3_to_float(code) * g).astype(np.float32) if nvfp4 else mxfp4_scale_value(code)
        by = PK.load(idx * (BLOCK // 2), BLOCK // 2, "dequant ElementVector load")
        per = 16 // es
        for i in range(BLOCK // per):
            el = i * per + np.arange(per)
            b = by[:, el // 2].astype(np.uint32)
            nib = np.where(el % 2 == 0, b & 0xF, b >> 4)
            with np.errstate(invalid="ignore", over="ignore"):
                v = (e2m1_to_float(nib) * mult[:, None]).astype(np.float32)
            OUT.store((idx * BLOCK + i * per) * es, from_float_bytes(v, dtype).reshape(idx.size, 16), 0,
                      "dequant 16-byte store")
        index += grid * 256
    assert OUT.init.all()
    raw = OUT.data
    if dtype == torch.float32:
        return torch.from_numpy(raw.view("<f4").copy()).reshape(rows, cols)
    if dtype == torch.float16:
        return torch.from_numpy(raw.view("<f2").copy()).reshape(rows, cols)
    return torch.from_numpy(raw.view("<i2").copy()).view(torch.bfloat16).reshape(rows, cols)


def same_bits(a, b):
    """Bit-identical, except that any NaN equals any NaN (payloads are not specified)."""
    a, b = a.reshape(-1).contiguous(), b.reshape(-1).contiguous()
    both_nan = torch.isnan(a.float()) & torch.isnan(b.float())
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return bool(((a.view(ints) == b.view(ints)) | both_nan).all())


def quant_suite():
    print("quantize / dequantize:")
    gen = torch.Generator().manual_seed(7)
    n_ok = 0
    for fmt in ("nvfp4", "mxfp4"):
        BLOCK = 16 if fmt == "nvfp4" else 32
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for shape, strided, special, given in [((7, 64), False, False, None), ((5, 96), True, False, None),
                                                   ((33, 128), False, True, None), ((4, 32), False, False, 0.0123),
                                                   ((9, 160), True, True, 3.5)]:
                if fmt == "mxfp4" and given is not None:
                    given = None
                rows, cols = shape
                base = torch.randn(rows, cols + (8 if strided else 0), generator=gen) * 3
                if special:
                    base[0, :BLOCK] = 0.0                                     # all-zero block
                    base[1, 3] = float("nan")                                 # NaN input
                    base[2, :BLOCK] = torch.tensor(([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25] * 4)[:BLOCK])  # ties
                    base[3, :BLOCK] = 1e-30                                   # tiny
                    base[4, :BLOCK] = 6e4 if dtype == torch.float16 else 1e30  # huge
                    if dtype == torch.float16:
                        base[4, :BLOCK] = 6e4
                x = base.to(dtype)
                x = x[:, 4:4 + cols] if strided else x
                gs = None if given is None else torch.tensor(given, dtype=torch.float32)
                pk, sc, g = quantize_emulated(x, fmt, gs)
                rp, rs, rg = quantize_fp4_reference(x.contiguous(), fmt, gs)
                rs_bytes = rs.view(torch.uint8) if rs.dtype != torch.uint8 else rs
                assert torch.equal(pk, rp), f"packed mismatch {fmt} {dtype} {shape} strided={strided} special={special}"
                assert torch.equal(sc, rs_bytes), f"scales mismatch {fmt} {dtype} {shape}"
                assert np.float32(rg.item()).view(np.uint32) == np.float32(g).view(np.uint32), "global mismatch"
                sc_t = sc.view(torch.float8_e4m3fn) if fmt == "nvfp4" else sc
                for od in (torch.float32, torch.float16, torch.bfloat16):
                    gt = torch.tensor(float(g), dtype=torch.float32)
                    out = dequantize_emulated(pk, sc_t, gt, fmt, od)
                    ref = dequantize_fp4_reference(pk, sc_t, gt, fmt, od)
                    assert same_bits(out, ref), f"dequant mismatch {fmt} {dtype}->{od}"
                n_ok += 1
        # every scale code and every byte, random global scales
        codes = torch.arange(256, dtype=torch.uint8).repeat_interleave(1).reshape(-1, 1)
        pk = torch.randint(0, 256, (256, BLOCK // 2), dtype=torch.uint8, generator=gen)
        pk[:, 0] = torch.arange(256, dtype=torch.uint8)
        if fmt == "nvfp4":
            sc_t = codes.view(torch.float8_e4m3fn)
            gt = torch.tensor(0.37, dtype=torch.float32)
        else:
            sc_t = codes
            gt = torch.tensor(1.0)
        for od in (torch.float32, torch.float16, torch.bfloat16):
            out = dequantize_emulated(pk, sc_t, gt, fmt, od)
            ref = dequantize_fp4_reference(pk, sc_t, gt, fmt, od)
            if fmt == "mxfp4":
                bad = ~((out == ref) | (torch.isnan(out) & torch.isnan(ref))).all(dim=1)
                rows_bad = torch.nonzero(bad).reshape(-1).tolist()
                assert rows_bad in ([], [255]), rows_bad
                print(f"  mxfp4 all codes -> {od}: identical except scale code {rows_bad} "
                      f"(kernel: {out[255, :2].tolist()}, reference: {ref[255, :2].tolist()})")
            else:
                assert same_bits(out, ref), f"nvfp4 all-codes dequant mismatch {od}"
        n_ok += 1
    print(f"  OK: {n_ok} quantize/dequantize configurations bit-exact vs the references")


def misaligned_dequant_check():
    print("dequantize with a contiguous but misaligned packed view:")
    raw = torch.randint(0, 256, (1, 40), dtype=torch.uint8)
    pk = raw[:, 8:24]  # M = 1, K = 32 (mxfp4): contiguous, offset 8 bytes
    sc = torch.full((1, 1), 127, dtype=torch.uint8)
    print(f"  packed = raw[:1, 8:24]: is_contiguous={pk.is_contiguous()} data_ptr%16={pk.data_ptr() % 16}")
    try:
        dequantize_emulated(pk, sc, torch.tensor(1.0), "mxfp4", torch.float32)
        print("  (no error)")
    except EmuError as e:
        print(f"  BUG reproduced: {e}")


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    torch.manual_seed(0)
    t0 = time.time()
    gemm_k0_check()
    caught = planted_bug_checks()
    quant_suite()
    misaligned_dequant_check()
    gemm_strided_x_checks()
    gemm_invalid_offs_checks()
    print("GEMM configurations:")
    res = gemm_suite(quick)
    res += random_fuzz()
    worst = max(r["err"] / max(r["baseline"], 1e-300) for r in res if r["baseline"] > 0)
    mism = sum(r["bf16_mismatch"] for r in res)
    worst_fp32 = max(r.get("fp32_rel_err", 0.0) for r in res)
    print(f"{len(res)} GEMM configurations within tolerance; worst err/baseline ratio {worst:.3f}; "
          f"bf16 outputs != round(ref): {mism}; worst fp32 pre-rounding rel err {worst_fp32:.1e}; "
          f"planted bugs caught {sum(v != 'NOT CAUGHT' for v in caught.values())}/{len(caught)}; "
          f"{time.time() - t0:.0f}s")
