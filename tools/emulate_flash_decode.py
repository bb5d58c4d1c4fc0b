"""Per-CTA emulator of csrc/include/helix/flash_decode_kernel.cuh (and the split merge).

A GPU-free check of the CUDA kernel's index arithmetic, fragment mappings, pipeline and
barriers against the documented hardware semantics: run it after changing the kernel (and
change it with the kernel; it mirrors the kernel's formulas, it does not read the .cuh).
  python tools/emulate_flash_decode.py [d64 d128 d256 mla] [quick]
It found no bug in the kernel as first written; it did catch seven planted ones
(EMU_MUTATE=<name> plants them).

Every shared-memory address, global address and fragment index is derived from the
same formulas as the kernel (line numbers of flash_decode_kernel.cuh in comments).
Hardware semantics (PTX ISA 9.7.x):
  * cp.async.cg 16 B with src-size 0 -> 16 zero bytes; data lands at cp.async.wait_group.
  * ldmatrix .m8n8 .x4 (.trans) .b16: lanes 8i..8i+7 address the rows of matrix i;
    lane l receives in register i the pair (row l/4, cols 2(l%4), 2(l%4)+1) of matrix i
    (with .trans: (rows 2(l%4), 2(l%4)+1, col l/4)).
  * mma.sync m16n8k16 row.col f32 (bf16/f16): a_i row = g (i in {0,1,4,5}) else g+8,
    col = 2t + (i&1) (+8 for i>=4); b_i row = 2t + (i&1) (+8 for i>=2), col = g;
    c_i row = g (i<2) else g+8, col = 2t + (i&1); g = lane>>2, t = lane%4.
Shared memory is a byte array with per-byte race tracking: in-flight cp.async bytes,
and last writer / reader thread per barrier epoch (RAW, WAR, WAW between different
threads inside one epoch are reported), and reads of never-written bytes.
"""
from __future__ import annotations

import itertools
import math
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from helix_ext.reference import flash_decode_reference  # noqa: E402

NEG_INF = np.float32(-np.inf)
MUT = os.environ.get("EMU_MUTATE", "")  # deliberate bugs, to show the emulator catches them
F32 = np.float32
LOG2E = F32(1.4426950408889634)
LN2 = F32(0.6931471805599453)
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


class EmuError(AssertionError):
    pass


def i32(x):
    """Value of a C `int` expression: must fit (else the kernel overflows)."""
    a = np.asarray(x)
    if a.size and (a.min() < INT32_MIN or a.max() > INT32_MAX):
        raise EmuError(f"int32 overflow: {a.min()}..{a.max()}")
    return x


def cdiv(a, b):  # C integer division (truncation)
    a = np.asarray(a, dtype=np.int64)
    q = np.abs(a) // abs(b)
    return np.where((a < 0) != (b < 0), -q, q) if a.ndim else int(-q if (a < 0) != (b < 0) else q)


def cmod(a, b):
    return np.asarray(a, dtype=np.int64) - cdiv(a, b) * b if np.ndim(a) else int(a - cdiv(a, b) * b)


# ----------------------------------------------------------------------------- numerics
def f32_to_bf16_bits(x):
    x = np.asarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    rounding = ((u >> 16) & 1) + 0x7FFF
    bits = ((u + rounding) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FFF), bits).astype(np.uint16)


def bf16_bits_to_f32(b):
    return (np.asarray(b).astype(np.uint32) << 16).view(np.float32)


def f32_to_f16_bits(x):
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float32).astype(np.float16).view(np.uint16)


def f16_bits_to_f32(b):
    return np.asarray(b, dtype=np.uint16).view(np.float16).astype(np.float32)


class Dtype:
    def __init__(self, name):
        self.name = name
        self.torch = torch.bfloat16 if name == "bf16" else torch.float16
        self.to_bits = f32_to_bf16_bits if name == "bf16" else f32_to_f16_bits
        self.to_f32 = bf16_bits_to_f32 if name == "bf16" else f16_bits_to_f32


def pack_pair(T, low, high):  # mma.cuh:71-86, RNE, low in the low half
    return T.to_bits(low).astype(np.uint32) | (T.to_bits(high).astype(np.uint32) << 16)


# E4M3 -> fp16 raw (exact), as __nv_cvt_fp8x2_to_halfraw2
_E4M3_F32 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
_E4M3_F16_BITS = _E4M3_F32.astype(np.float16).view(np.uint16)


def widen_fp8_pair(T, pair):  # flash_decode_kernel.cuh:97-108
    pair = np.asarray(pair, dtype=np.uint32)
    hx = _E4M3_F16_BITS[pair & 0xFF]
    hy = _E4M3_F16_BITS[(pair >> 8) & 0xFF]
    if T.name == "fp16":
        return hx.astype(np.uint32) | (hy.astype(np.uint32) << 16)
    vx, vy = f16_bits_to_f32(hx), f16_bits_to_f32(hy)
    return pack_pair(T, vx, vy)


def exp2f(x):
    with np.errstate(invalid="ignore", over="ignore"):
        return np.exp2(np.asarray(x, dtype=np.float32)).astype(np.float32)


# softmax_merge.h, vectorised (state arrays are float32)
def online_softmax_rescale(smax, ssum, tile_max):
    new_max = np.where(smax > tile_max, smax, tile_max).astype(F32)
    empty = new_max == NEG_INF
    with np.errstate(invalid="ignore"):
        alpha = exp2f(smax - np.where(empty, 0, new_max))
    ssum = np.where(empty, ssum, (ssum * alpha).astype(F32)).astype(F32)
    smax = np.where(empty, smax, new_max).astype(F32)
    return smax, ssum, np.where(empty, F32(1), alpha).astype(F32)


def online_softmax_offset(smax):
    return np.where(smax == NEG_INF, F32(0), smax).astype(F32)


def online_softmax_lse(smax, ssum):
    with np.errstate(divide="ignore"):
        return np.where(smax == NEG_INF, NEG_INF, ((smax + np.log2(ssum).astype(F32)) * LN2).astype(F32)).astype(F32)


# ----------------------------------------------------------------------------- memories
class Global:
    """A global buffer (bytes) with bounds/alignment checks and write tracking."""

    def __init__(self, name, data: np.ndarray, writable=False):
        self.name = name
        self.bytes = data.view(np.uint8).reshape(-1)
        self.writable = writable
        self.written = np.zeros(self.bytes.size, np.int32) if writable else None

    def _check(self, addr, n, align):
        addr = np.asarray(addr, dtype=np.int64)
        if addr.size and (addr.min() < 0 or addr.max() + n > self.bytes.size):
            raise EmuError(f"out-of-bounds access to {self.name}: [{addr.min()}, {addr.max() + n}) of {self.bytes.size}")
        if addr.size and np.any(addr % align):
            raise EmuError(f"misaligned {n}-byte access to {self.name}")
        return addr

    def read(self, addr, n, align=None):
        addr = self._check(addr, n, align or n)
        return self.bytes[addr[..., None] + np.arange(n)]

    def write(self, addr, data_bytes, n):
        addr = self._check(addr, n, n)
        idx = (addr[..., None] + np.arange(n)).reshape(-1)
        self.bytes[idx] = np.asarray(data_bytes, dtype=np.uint8).reshape(-1)
        np.add.at(self.written, idx, 1)


class Smem:
    def __init__(self, nbytes):
        self.n = nbytes
        self.mem = np.full(nbytes, 0xFF, np.uint8)  # garbage = NaN in bf16/fp16/fp32
        self.pending = np.zeros(nbytes, bool)
        self.w_epoch = np.full(nbytes, -1, np.int64)
        self.w_thr = np.full(nbytes, -1, np.int64)
        self.r_epoch = np.full(nbytes, -1, np.int64)
        self.r_thr = np.full(nbytes, -1, np.int64)  # -1: several readers (or a warp's ldmatrix)
        self.epoch = 0
        self.open = []
        self.groups = []
        self.errors = []

    def err(self, msg):
        if len(self.errors) < 20:
            self.errors.append(f"epoch {self.epoch}: {msg}")

    def _idx(self, addr, n, align):
        addr = np.asarray(addr, dtype=np.int64)
        if addr.size and (addr.min() < 0 or addr.max() + n > self.n):
            raise EmuError(f"shared-memory access out of bounds: [{addr.min()}, {addr.max() + n}) of {self.n}")
        if addr.size and np.any(addr % align):
            raise EmuError(f"misaligned shared access ({n} B, align {align})")
        return addr[..., None] + np.arange(n)

    def _check_write(self, idx, thr, what):
        thr = np.broadcast_to(np.asarray(thr)[..., None], idx.shape)
        if self.pending[idx].any():
            self.err(f"{what}: write to bytes with a cp.async in flight (WAW)")
        war = (self.r_epoch[idx] == self.epoch) & (self.r_thr[idx] != thr)
        if war.any():
            self.err(f"{what}: write-after-read race (bytes read by another thread in the same barrier interval)")
        waw = (self.w_epoch[idx] == self.epoch) & (self.w_thr[idx] != thr)
        if waw.any():
            self.err(f"{what}: write-after-write race in one barrier interval")
        flat = idx.reshape(-1)
        if np.unique(flat).size != flat.size:
            self.err(f"{what}: two threads write the same bytes in one access")

    def _check_read(self, idx, thr, what, collective=False):
        if self.pending[idx].any():
            self.err(f"{what}: read of bytes whose cp.async has not been waited for")
        if (self.w_epoch[idx] < 0).any():
            self.err(f"{what}: read of never-written shared memory ({int((self.w_epoch[idx] < 0).sum())} bytes)")
        same = self.w_epoch[idx] == self.epoch
        if collective:
            raw = same
        else:
            raw = same & (self.w_thr[idx] != np.broadcast_to(np.asarray(thr)[..., None], idx.shape))
        if raw.any():
            self.err(f"{what}: read-after-write race (written by another thread in the same barrier interval)")
        # record readers
        flat = idx.reshape(-1)
        if collective:
            self.r_epoch[flat] = self.epoch
            self.r_thr[flat] = -1
        else:
            t = np.broadcast_to(np.asarray(thr)[..., None], idx.shape).reshape(-1)
            prior_same = (self.r_epoch[flat] == self.epoch) & (self.r_thr[flat] != t)
            order = np.argsort(flat, kind="stable")
            fs, ts = flat[order], t[order]
            multi = np.zeros(flat.size, bool)
            if fs.size > 1:
                d = (fs[1:] == fs[:-1]) & (ts[1:] != ts[:-1])
                multi[order[1:][d]] = True
                multi[order[:-1][d]] = True
            newthr = np.where(prior_same | multi, -1, t)
            self.r_epoch[flat] = self.epoch
            # any index appearing with -1 must end -1
            self.r_thr[flat] = newthr
            self.r_thr[flat[newthr == -1]] = -1

    # plain st.shared / ld.shared
    def st(self, addr, data_bytes, n, thr, what="st.shared"):
        idx = self._idx(addr, n, n)
        self._check_write(idx, thr, what)
        flat = idx.reshape(-1)
        self.mem[flat] = np.asarray(data_bytes, dtype=np.uint8).reshape(-1)
        self.w_epoch[flat] = self.epoch
        self.w_thr[flat] = np.broadcast_to(np.asarray(thr)[..., None], idx.shape).reshape(-1)

    def ld(self, addr, n, thr, what="ld.shared"):
        idx = self._idx(addr, n, n)
        self._check_read(idx, thr, what)
        return self.mem[idx]

    # cp.async.cg.shared.global [dst], [src], 16, src_size
    def cp_async_16(self, dst, gbuf: Global, src, valid, thr, what="cp.async"):
        dst = np.asarray(dst, dtype=np.int64)
        valid = np.asarray(valid, dtype=bool)
        idx = self._idx(dst, 16, 16)
        self._check_write(idx, thr, what)
        data = np.zeros((dst.size, 16), np.uint8)
        if valid.any():
            data[valid] = gbuf.read(np.asarray(src, dtype=np.int64)[valid], 16)
        self.pending[idx.reshape(-1)] = True
        self.open.append((idx.reshape(-1), data.reshape(-1), np.repeat(np.asarray(thr), 16)))

    def commit(self):
        self.groups.append(self.open)
        self.open = []

    def wait_group(self, n):
        land = self.groups[: max(0, len(self.groups) - n)]
        self.groups = self.groups[len(land):]
        for group in land:
            for idx, data, thr in group:
                self.mem[idx] = data
                self.pending[idx] = False
                self.w_epoch[idx] = self.epoch
                self.w_thr[idx] = thr

    def syncthreads(self):
        self.epoch += 1

    def ldmatrix_x4(self, addr, trans, W):
        a = np.asarray(addr, dtype=np.int64).reshape(W, 4, 8)  # lane = 8 * matrix + row
        idx = self._idx(a, 16, 16)  # W,4,8,16
        self._check_read(idx, None, "ldmatrix" + (".trans" if trans else ""), collective=True)
        vals = self.mem[idx].view(np.uint16).reshape(W, 4, 8, 8)  # [warp, matrix, row, col]
        lane = np.arange(32)
        g, t = lane // 4, lane % 4
        if not trans:
            lo, hi = vals[:, :, g, 2 * t], vals[:, :, g, 2 * t + 1]
        else:
            lo, hi = vals[:, :, 2 * t, g], vals[:, :, 2 * t + 1, g]
        regs = lo.astype(np.uint32) | (hi.astype(np.uint32) << 16)  # W,4,32
        return regs.transpose(0, 2, 1).reshape(W * 32, 4)


# ----------------------------------------------------------------------------- warp ops
_LANE = np.arange(32)
_G, _T = _LANE >> 2, _LANE % 4


def mma_m16n8k16(T, d, a, b0, b1):
    """d [N,4] f32 (+=), a [N,4] u32, b0/b1 [N] u32; per PTX fragment layouts."""
    W = d.shape[0] // 32
    a = a.reshape(W, 32, 4)
    b = np.stack([b0, b1], -1).reshape(W, 32, 2)
    c = d.reshape(W, 32, 4).astype(np.float64)
    A = np.full((W, 16, 16), np.nan)
    B = np.full((W, 16, 8), np.nan)
    C = np.full((W, 16, 8), np.nan)
    for i in range(8):
        reg, half = i // 2, i % 2
        row = _G if (i < 2 or 4 <= i < 6) else _G + 8
        col = _T * 2 + (i & 1) + (8 if i >= 4 else 0)
        A[:, row, col] = T.to_f32((a[:, :, reg] >> (16 * half)) & 0xFFFF)
    for i in range(4):
        reg, half = i // 2, i % 2
        row = _T * 2 + (i & 1) + (8 if i >= 2 else 0)
        B[:, row, _G] = T.to_f32((b[:, :, reg] >> (16 * half)) & 0xFFFF)
    for i in range(4):
        row = _G if i < 2 else _G + 8
        C[:, row, _T * 2 + (i & 1)] = c[:, :, i]
    with np.errstate(invalid="ignore", over="ignore"):
        D = (np.einsum("wmk,wkn->wmn", A, B) + C).astype(np.float32)
    out = np.empty((W, 32, 4), np.float32)
    for i in range(4):
        row = _G if i < 2 else _G + 8
        out[:, :, i] = D[:, row, _T * 2 + (i & 1)]
    return out.reshape(W * 32, 4)


def shfl_xor(v, mask):
    tid = np.arange(v.shape[0])
    return v[tid ^ mask]


# ----------------------------------------------------------------------------- config
class Config:
    def __init__(self, DK, DV, WARPS_M, WARPS_V, WARPS_T, TILE, STAGES, SHARED_KV):
        self.DK, self.DV, self.WARPS_M, self.WARPS_V, self.WARPS_T = DK, DV, WARPS_M, WARPS_V, WARPS_T
        self.TILE, self.STAGES, self.SHARED_KV = TILE, STAGES, SHARED_KV
        self.kWarps = WARPS_M * WARPS_V * WARPS_T
        self.kThreads = 32 * self.kWarps
        self.kHeadsPerCta = 16 * WARPS_M
        self.kTokensPerWarp = TILE // WARPS_T
        self.kDvPerWarp = DV // WARPS_V
        assert DK % 16 == 0 and self.kDvPerWarp % 16 == 0
        assert self.kTokensPerWarp % 16 == 0
        assert (not SHARED_KV) or DV <= DK
        assert STAGES >= 2
        self.kKRow, self.kVRow = DK + 8, DV + 8
        self.kQElements = self.kHeadsPerCta * self.kKRow
        self.kTileElements = TILE * self.kKRow + (0 if SHARED_KV else TILE * self.kVRow)
        self.kKRow8, self.kVRow8 = DK + 16, DV + 16
        self.kTileBytes8 = TILE * self.kKRow8 + (0 if SHARED_KV else TILE * self.kVRow8)

    def pipeline_bytes(self, fp8):
        return self.STAGES * self.kTileBytes8 + self.kTileElements * 2 if fp8 else self.STAGES * self.kTileElements * 2

    def epilogue_bytes(self):
        return self.WARPS_T * self.kHeadsPerCta * (2 * 4 + self.DV * 4)

    def smem_bytes(self, fp8):
        return self.kQElements * 2 + max(self.pipeline_bytes(fp8), self.epilogue_bytes())

    def __repr__(self):
        return (f"Config<{self.DK},{self.DV},M{self.WARPS_M},V{self.WARPS_V},T{self.WARPS_T},"
                f"TILE{self.TILE},S{self.STAGES},{'MLA' if self.SHARED_KV else 'sep'}>")


CONFIGS = {
    "d64": Config(64, 64, 1, 1, 4, 64, 3, False),
    "d128": Config(128, 128, 1, 1, 4, 64, 3, False),
    "d256": Config(256, 256, 1, 1, 4, 64, 2, False),
    "mla": Config(576, 512, 4, 2, 1, 32, 3, True),
}


# ----------------------------------------------------------------------------- the kernel
class Params:
    pass


def flash_decode_cta(cfg: Config, T: Dtype, KV_FP8: bool, P: Params, G: dict, blockIdx, stats):
    DK, DV, TILE = cfg.DK, cfg.DV, cfg.TILE
    STAGES, THREADS = cfg.STAGES, cfg.kThreads
    HEADS, TOKENS_PER_WARP = cfg.kHeadsPerCta, cfg.kTokensPerWarp
    DV_PER_WARP, WARPS_M, WARPS_V, WARPS_T = cfg.kDvPerWarp, cfg.WARPS_M, cfg.WARPS_V, cfg.WARPS_T
    KROW, VROW = cfg.kKRow, cfg.kVRow
    S_TILES = TOKENS_PER_WARP // 8
    O_TILES = DV_PER_WARP // 8
    KV_ELEMENT_BYTES = 1 if KV_FP8 else 2
    K_CHUNKS, V_CHUNKS = DK * KV_ELEMENT_BYTES // 16, DV * KV_ELEMENT_BYTES // 16
    assert DK * KV_ELEMENT_BYTES % 16 == 0 and DV * KV_ELEMENT_BYTES % 16 == 0
    W = THREADS // 32

    sm = Smem(cfg.smem_bytes(KV_FP8))
    q_tile = 0  # byte address (T*) of `shared`
    body = cfg.kQElements * 2

    bx, by, bz = blockIdx
    head_tile = bx % P.head_tiles
    split = bx // P.head_tiles
    batch, kv_head = by, bz
    tid = np.arange(THREADS)
    warp, lane = tid // 32, tid % 32
    warp_m = warp % WARPS_M
    warp_v = (warp // WARPS_M) % WARPS_V
    warp_t = warp // (WARPS_M * WARPS_V)

    # :144-156
    capacity = i32(P.max_blocks_per_seq * P.block_size)
    raw_len = int(G["seq_lens"].read(np.array([(batch * P.seq_lens_stride) * 4]), 4).view(np.int32).reshape(-1)[0])
    length = 0 if raw_len < 0 else (capacity if raw_len > capacity else raw_len)
    tiles_total = i32(cdiv(i32(length + TILE - 1), TILE))
    tiles_per_split = i32(cdiv(i32(tiles_total + P.num_splits - 1), P.num_splits))
    begin64 = split * tiles_per_split * TILE
    begin = begin64 if begin64 < length else length
    end = i32(begin + i32(tiles_per_split * TILE))
    end = end if end < length else length
    first_head_in_group = i32(head_tile * HEADS)
    heads_here = P.group_size - first_head_in_group if P.group_size - first_head_in_group < HEADS else HEADS
    first_head = kv_head * P.group_size + first_head_in_group
    out_row0 = batch * P.num_q_heads + first_head
    single_split = P.num_splits == 1
    Tsz = 2

    if begin >= end:  # :158-174
        index = np.arange(heads_here)  # for (index = threadIdx.x; index < heads_here; index += THREADS)
        if single_split:
            G["out_lse"].write((out_row0 + index) * 4, np.full(index.size, NEG_INF, F32).view(np.uint8), 4)
        else:
            G["partial_lse"].write((split * P.batch * P.num_q_heads + out_row0 + index) * 4,
                                   np.full(index.size, NEG_INF, F32).view(np.uint8), 4)
        if single_split:
            index = np.arange(heads_here * DV)
            G["out"].write((out_row0 * DV + index) * Tsz, T.to_bits(np.zeros(index.size, F32)).view(np.uint8), 2)
        stats["empty_ctas"] += 1
        return sm

    # Q rows :177-186
    qbase = batch * P.q_stride_batch  # elements
    Q_CHUNKS = DK // 8
    chunk = np.arange(HEADS * Q_CHUNKS)
    thr = chunk % THREADS
    row, column = chunk // Q_CHUNKS, chunk % Q_CHUNKS
    valid = row < heads_here
    source = qbase + np.where(valid, (first_head + row) * P.q_stride_head + column * 8, 0)
    sm.cp_async_16(q_tile + (row * KROW + column * 8) * 2, G["q"], (P.q_offset + source) * Tsz, valid, thr, "cp.async(q)")

    tiles = cdiv(i32(end - begin + TILE - 1), TILE)
    table_base = batch * P.block_table_stride_batch  # int32 elements

    STAGE_BYTES = cfg.kTileBytes8 if KV_FP8 else cfg.kTileElements * 2
    K_ROW_BYTES = cfg.kKRow8 if KV_FP8 else KROW * 2
    V_ROW_BYTES = cfg.kVRow8 if KV_FP8 else VROW * 2

    def load_rows(destination, row_bytes, cache_name, cache_off, stride_block, stride_token, stride_head, chunks,
                  first_token):  # :198-214
        chunk = np.arange(TILE * chunks)
        thr = chunk % THREADS
        row, column = chunk // chunks, chunk % chunks
        token = i32(first_token + row)
        valid = token < end
        src = np.zeros(chunk.size, np.int64)
        if MUT == "nozfill":
            keep = valid.copy()
            chunk, thr, row, column, token, valid = chunk[keep], thr[keep], row[keep], column[keep], token[keep], valid[keep]
            src = src[keep]
        if valid.any():
            tv = token[valid]
            entry = table_base + cdiv(tv, P.block_size) * P.block_table_stride_block
            block = G["block_table"].read((P.bt_offset + entry) * 4, 4).view(np.int32).reshape(-1).astype(np.int64)
            bad = (block < 0) | (block >= P.num_blocks)
            if bad.any():
                stats["clamped_block_ids"] += int(bad.sum())
            block = np.where(bad, 0, block)
            src[valid] = cache_off + ((block * stride_block + cmod(tv, P.block_size) * stride_token +
                                       kv_head * stride_head) * KV_ELEMENT_BYTES) + column[valid] * 16
        sm.cp_async_16(destination + row * row_bytes + column * 16, G[cache_name], src, valid, thr,
                       f"cp.async({cache_name})")

    def load_tile(tile_index):  # :215-227
        if tile_index < tiles:
            stage = body + (tile_index % STAGES) * STAGE_BYTES
            first_token = i32(begin + tile_index * TILE)
            load_rows(stage, K_ROW_BYTES, "k_cache", P.k_offset, P.k_stride_block, P.k_stride_token,
                      P.k_stride_head, K_CHUNKS, first_token)
            if not cfg.SHARED_KV:
                load_rows(stage + TILE * K_ROW_BYTES, V_ROW_BYTES, "v_cache", P.v_offset, P.v_stride_block,
                          P.v_stride_token, P.v_stride_head, V_CHUNKS, first_token)
        sm.commit()

    widened = body + STAGES * STAGE_BYTES  # T*

    def widen_rows(source, source_row_bytes, destination, destination_row, dims):  # :231-248
        chunks = dims // 16
        chunk = np.arange(TILE * chunks)
        thr = chunk % THREADS
        row, column = chunk // chunks, chunk % chunks
        packed = sm.ld(source + row * source_row_bytes + column * 16, 16, thr, "ld.shared(fp8 stage)")
        words = packed.reshape(-1, 16).view(np.uint32).reshape(-1, 4)  # x, y, z, w
        pairs = np.empty((chunk.size, 8), np.uint32)
        for i in range(4):
            pairs[:, 2 * i] = widen_fp8_pair(T, words[:, i] & 0xFFFF)
            pairs[:, 2 * i + 1] = widen_fp8_pair(T, words[:, i] >> 16)
        target = destination + (row * destination_row + column * 16) * Tsz
        sm.st(target, pairs[:, 0:4].copy().view(np.uint8), 16, thr, "st.shared(widened)")
        sm.st(target + 16, pairs[:, 4:8].copy().view(np.uint8), 16, thr, "st.shared(widened)")

    k_scale = None if P.k_scale is None else F32(P.k_scale)
    v_scale = None if P.v_scale is None else F32(P.v_scale)
    score_scale = F32(F32(F32(P.softmax_scale) * (k_scale if k_scale is not None else F32(1))) * LOG2E)
    value_scale = v_scale if v_scale is not None else F32(1)

    st_max = np.full((THREADS, 2), NEG_INF, F32)
    st_sum = np.zeros((THREADS, 2), F32)
    output = np.zeros((THREADS, O_TILES, 4), F32)

    for s in range(STAGES - 1):
        load_tile(s)

    q_address = q_tile + ((warp_m * 16 + lane % 16) * KROW + (lane // 16) * 8) * Tsz  # :266
    token_base = warp_t * TOKENS_PER_WARP

    for tile in range(tiles):  # :269
        sm.wait_group(STAGES - 1 if MUT == "wait" else STAGES - 2)
        if MUT != "sync_top":
            sm.syncthreads()
        load_tile(tile + STAGES - 1)

        if KV_FP8:
            stage = body + (tile % STAGES) * STAGE_BYTES
            widen_rows(stage, cfg.kKRow8, widened, KROW, DK)
            if not cfg.SHARED_KV:
                widen_rows(stage + TILE * cfg.kKRow8, cfg.kVRow8, widened + TILE * KROW * Tsz, VROW, DV)
            if MUT != "sync_widen":
                sm.syncthreads()
            k_tile = widened
        else:
            k_tile = body + (tile % STAGES) * STAGE_BYTES
        if cfg.SHARED_KV:
            v_tile, v_row = k_tile, KROW
        else:
            v_tile, v_row = k_tile + TILE * KROW * Tsz, VROW

        scores = np.zeros((THREADS, S_TILES, 4), F32)
        k_address = k_tile + ((token_base + lane % 8 + (lane // 16) * 8) * KROW + ((lane // 8) % 2) * 8) * Tsz
        if MUT == "k_address":
            k_address = k_tile + ((token_base + lane % 8 + ((lane // 8) % 2) * 8) * KROW + (lane // 16) * 8) * Tsz
        for k in range(DK // 16):
            a = sm.ldmatrix_x4(q_address + k * 32, False, W)
            for n in range(S_TILES // 2):
                b = sm.ldmatrix_x4(k_address + (n * 16 * KROW + k * 16) * 2, False, W)
                scores[:, 2 * n] = mma_m16n8k16(T, scores[:, 2 * n], a, b[:, 0], b[:, 1])
                scores[:, 2 * n + 1] = mma_m16n8k16(T, scores[:, 2 * n + 1], a, b[:, 2], b[:, 3])

        tile_first = begin + tile * TILE + token_base
        tile_max = np.full((THREADS, 2), NEG_INF, F32)
        for n in range(S_TILES):
            for i in range(4):
                token = i32(tile_first + n * 8 + (lane % 4) * 2 + (i % 2))
                scores[:, n, i] = np.where(token < end, (scores[:, n, i] * score_scale).astype(F32), NEG_INF)
                tile_max[:, i // 2] = np.fmax(tile_max[:, i // 2], scores[:, n, i])
        offset = np.zeros((THREADS, 2), F32)
        for r in range(2):
            tile_max[:, r] = np.fmax(tile_max[:, r], shfl_xor(tile_max[:, r], 1))
            tile_max[:, r] = np.fmax(tile_max[:, r], shfl_xor(tile_max[:, r], 2))
            st_max[:, r], st_sum[:, r], alpha = online_softmax_rescale(st_max[:, r], st_sum[:, r], tile_max[:, r])
            for n in range(O_TILES):
                output[:, n, 2 * r] *= alpha
                output[:, n, 2 * r + 1] *= alpha
            offset[:, r] = online_softmax_offset(st_max[:, r])

        v_address = v_tile + ((token_base + lane % 8 + ((lane // 8) % 2) * 8) * v_row + warp_v * DV_PER_WARP +
                              (lane // 16) * 8) * Tsz
        if MUT == "v_address":
            v_address = v_tile + ((token_base + lane % 8 + (lane // 16) * 8) * v_row + warp_v * DV_PER_WARP +
                                  ((lane // 8) % 2) * 8) * Tsz
        for j in range(S_TILES // 2):
            p = np.zeros((THREADS, 2, 4), F32)
            for h in range(2):
                for i in range(4):
                    p[:, h, i] = exp2f(scores[:, 2 * j + h, i] - offset[:, i // 2])
                    st_sum[:, i // 2] = (st_sum[:, i // 2] + p[:, h, i]).astype(F32)
            a = np.stack([pack_pair(T, p[:, 0, 0], p[:, 0, 1]), pack_pair(T, p[:, 0, 2], p[:, 0, 3]),
                          pack_pair(T, p[:, 1, 0], p[:, 1, 1]), pack_pair(T, p[:, 1, 2], p[:, 1, 3])], -1)
            if MUT == "p_order":
                a = a[:, [0, 2, 1, 3]]
            for n in range(O_TILES // 2):
                b = sm.ldmatrix_x4(v_address + (j * 16 * v_row + n * 16) * 2, True, W)
                output[:, 2 * n] = mma_m16n8k16(T, output[:, 2 * n], a, b[:, 0], b[:, 1])
                output[:, 2 * n + 1] = mma_m16n8k16(T, output[:, 2 * n + 1], a, b[:, 2], b[:, 3])

    # Epilogue :369-444
    for r in range(2):
        st_sum[:, r] = (st_sum[:, r] + shfl_xor(st_sum[:, r], 1)).astype(F32)
        st_sum[:, r] = (st_sum[:, r] + shfl_xor(st_sum[:, r], 2)).astype(F32)
    sm.wait_group(0)
    sm.syncthreads()
    if sm.open:
        sm.err("uncommitted cp.async at the epilogue")

    slice_state = body  # float*
    slice_output = slice_state + WARPS_T * HEADS * 2 * 4
    row0 = warp_m * 16 + lane // 4
    sel = (warp_v == 0) & (lane % 4 == 0)
    for r in range(2):
        addr = slice_state + ((warp_t * HEADS + row0 + 8 * r) * 2) * 4
        sm.st(addr[sel], st_max[sel, r].astype(F32).view(np.uint8), 4, tid[sel], "st.shared(slice max)")
        sm.st(addr[sel] + 4, st_sum[sel, r].astype(F32).view(np.uint8), 4, tid[sel], "st.shared(slice sum)")
    sm.syncthreads()

    for r in range(2):
        row = row0 + 8 * r
        t_max, t_sum = np.full(THREADS, NEG_INF, F32), np.zeros(THREADS, F32)
        for t in range(WARPS_T):
            slice_max = sm.ld(slice_state + ((t * HEADS + row) * 2) * 4, 4, tid).view(np.float32).reshape(-1)
            slice_sum = sm.ld(slice_state + ((t * HEADS + row) * 2 + 1) * 4, 4, tid).view(np.float32).reshape(-1)
            t_max, t_sum, _ = online_softmax_rescale(t_max, t_sum, slice_max)
            with np.errstate(invalid="ignore"):
                add = (slice_sum * exp2f(slice_max - t_max)).astype(F32)
            t_sum = np.where(slice_max != NEG_INF, (t_sum + add).astype(F32), t_sum).astype(F32)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where((t_sum > 0) & (st_max[:, r] != NEG_INF),
                             ((exp2f(st_max[:, r] - t_max) / t_sum).astype(F32) * value_scale).astype(F32), F32(0))
        for n in range(O_TILES):
            column = warp_v * DV_PER_WARP + n * 8 + (lane % 4) * 2
            target = slice_output + ((warp_t * HEADS + row) * DV + column) * 4
            val = np.stack([output[:, n, 2 * r] * share, output[:, n, 2 * r + 1] * share], -1).astype(F32)
            sm.st(target, val.view(np.uint8), 8, tid, "st.shared(slice output)")
        wsel = (warp_v == 0) & (warp_t == 0) & (lane % 4 == 0) & (row < heads_here)
        lse = online_softmax_lse(t_max, t_sum)
        if wsel.any():
            if single_split:
                G["out_lse"].write((out_row0 + row[wsel]) * 4, lse[wsel].view(np.uint8), 4)
            else:
                G["partial_lse"].write((split * P.batch * P.num_q_heads + out_row0 + row[wsel]) * 4,
                                       lse[wsel].view(np.uint8), 4)
    sm.syncthreads()

    QUADS = DV // 4
    index = np.arange(heads_here * QUADS)
    thr = index % THREADS
    row, column = index // QUADS, (index % QUADS) * 4
    total = sm.ld(slice_output + (row * DV + column) * 4, 16, thr, "ld.shared(slice sum)").view(np.float32)
    total = total.reshape(-1, 4).copy()
    for t in range(1, WARPS_T):
        part = sm.ld(slice_output + ((t * HEADS + row) * DV + column) * 4, 16, thr).view(np.float32).reshape(-1, 4)
        total = (total + part).astype(F32)
    if single_split:
        G["out"].write(((out_row0 + row) * DV + column) * Tsz, T.to_bits(total).view(np.uint8), 8)
    else:
        partial_row = split * P.batch * P.num_q_heads + out_row0 + row
        G["partial_out"].write((partial_row * DV + column) * 4, total.view(np.uint8), 16)
    stats["ctas"] += 1
    stats["tiles"] += tiles
    return sm


# ----------------------------------------------------------------------------- merge kernel
def merge_weight(part_lse, total_lse):
    with np.errstate(invalid="ignore", over="ignore"):
        w = np.exp((part_lse - total_lse).astype(F32)).astype(F32)
    return np.where((total_lse == NEG_INF) | (part_lse == NEG_INF), F32(0), w).astype(F32)


def merge_states_emulated(M, G, T: Dtype):
    """merge_states_kernel<float, T, VEC>; launch_merge_states<float, T> chooses VEC."""
    kVec = 16 // 4
    out_is_aligned = True  # at::empty outputs are 16-B aligned
    vectorizable = (M.out_stride_dim == 1 and M.head_dim % kVec == 0 and M.out_stride_part % kVec == 0 and
                    M.out_stride_batch % kVec == 0 and M.out_stride_head % kVec == 0 and out_is_aligned)
    VEC = kVec if vectorizable else 1
    vectors_per_row = M.head_dim // VEC
    total_vectors = M.num_rows * vectors_per_row
    index = np.arange(total_vectors, dtype=np.int64)
    row = index // vectors_per_row
    element = (index - row * vectors_per_row) * VEC
    batch = row // M.num_heads
    head = row - batch * M.num_heads
    row_lse = batch * M.lse_stride_batch + head * M.lse_stride_head
    row_out = batch * M.out_stride_batch + head * M.out_stride_head + element * M.out_stride_dim
    lses = [G["partial_lse"].read((row_lse + p * M.lse_stride_part) * 4, 4).view(np.float32).reshape(-1)
            for p in range(M.num_parts)]
    # merged_lse: softmax_state_add over parts (natural log)
    smax = np.full(index.size, NEG_INF, F32)
    ssum = np.zeros(index.size, F32)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for x in lses:
            present = x != NEG_INF
            bigger = present & (x > smax)
            new_sum_big = (ssum * np.exp((smax - x).astype(F32)).astype(F32) + F32(1)).astype(F32)
            new_sum_small = (ssum + np.exp((x - smax).astype(F32)).astype(F32)).astype(F32)
            ssum = np.where(bigger, new_sum_big, np.where(present, new_sum_small, ssum)).astype(F32)
            smax = np.where(bigger, x, smax).astype(F32)
        total_lse = np.where(smax == NEG_INF, NEG_INF, (smax + np.log(ssum).astype(F32)).astype(F32)).astype(F32)
    acc = np.zeros((index.size, VEC), F32)
    for p in range(M.num_parts):
        w = merge_weight(lses[p], total_lse)
        nz = w != 0
        if nz.any():
            vals = G["partial_out"].read((row_out[nz] + p * M.out_stride_part) * 4, 4 * VEC, 4 * VEC if VEC > 1 else 4)
            vals = vals.reshape(-1, 4 * VEC).view(np.float32).reshape(-1, VEC)
            acc[nz] = (acc[nz] + (w[nz, None] * vals).astype(F32)).astype(F32)
    G["out"].write((row * M.head_dim + element) * 2, T.to_bits(acc).view(np.uint8).reshape(index.size, -1),
                   2 * VEC)
    first = element == 0
    G["out_lse"].write(row[first] * 4, total_lse[first].view(np.uint8), 4)


# ----------------------------------------------------------------------------- launcher
def tensor_buffer(t: torch.Tensor):
    """(Global-ready numpy bytes of the whole storage, element offset)."""
    n = t.untyped_storage().nbytes() // t.element_size()
    whole = torch.as_strided(t, (n,), (1,), 0)
    return whole.contiguous().view(torch.uint8).numpy().copy(), t.storage_offset()


def flash_decode_emulated(q, k_cache, v_cache, block_table, seq_lens, softmax_scale, head_dim_v=-1, k_scale=None,
                          v_scale=None, num_splits=1, config=None, stats=None, race_report=None):
    stats = stats if stats is not None else {}
    for key in ("ctas", "empty_ctas", "tiles", "clamped_block_ids"):
        stats.setdefault(key, 0)
    T = Dtype("bf16" if q.dtype == torch.bfloat16 else "fp16")
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    mla = v_cache is None
    cfg = CONFIGS[config]
    B, Hq, Dk = q.shape
    num_blocks, block_size, Hkv, _ = k_cache.shape
    Dv = (Dk if head_dim_v == -1 else head_dim_v) if mla else v_cache.shape[3]
    assert (Dk, Dv) == (cfg.DK, cfg.DV)
    max_blocks = block_table.shape[1]
    capacity = max_blocks * block_size
    assert capacity < 2 ** 31
    # check_aligned_rows
    for t, dims in ((q, (0, 1)), (k_cache, (0, 1, 2))) + (((v_cache, (0, 1, 2)),) if v_cache is not None else ()):
        assert all((t.stride(d) * t.element_size()) % 16 == 0 for d in dims)
    P = Params()
    G = {}
    qb, P.q_offset = tensor_buffer(q)
    G["q"] = Global("q", qb)
    P.q_stride_batch, P.q_stride_head = q.stride(0), q.stride(1)
    kb, koff = tensor_buffer(k_cache)
    G["k_cache"] = Global("k_cache", kb)
    P.k_offset = koff * k_cache.element_size()  # bytes (kernel adds byte offsets to the char*)
    P.k_stride_block, P.k_stride_token, P.k_stride_head = k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)
    values = v_cache if v_cache is not None else k_cache
    vb, voff = tensor_buffer(values)
    G["v_cache"] = Global("v_cache", vb)
    P.v_offset = voff * values.element_size()
    P.v_stride_block, P.v_stride_token, P.v_stride_head = values.stride(0), values.stride(1), values.stride(2)
    btb, P.bt_offset = tensor_buffer(block_table)
    G["block_table"] = Global("block_table", btb)
    P.block_table_stride_batch, P.block_table_stride_block = block_table.stride(0), block_table.stride(1)
    slb, sloff = tensor_buffer(seq_lens)
    G["seq_lens"] = Global("seq_lens", slb[sloff * 4:])
    P.seq_lens_stride = seq_lens.stride(0)
    P.k_scale = None if k_scale is None else float(k_scale.item())
    P.v_scale = P.k_scale if mla else (None if v_scale is None else float(v_scale.item()))
    P.softmax_scale = softmax_scale
    P.batch, P.num_q_heads, P.num_kv_heads = B, Hq, Hkv
    P.group_size = Hq // Hkv
    P.block_size, P.max_blocks_per_seq, P.num_blocks = block_size, max_blocks, num_blocks
    P.head_tiles = (P.group_size + cfg.kHeadsPerCta - 1) // cfg.kHeadsPerCta
    P.num_splits = int(num_splits)
    assert P.num_splits >= 1
    out_bits = np.full(B * Hq * Dv, 0xFFFF, np.uint16)
    out_lse = np.full(B * Hq, np.nan, F32)
    G["out"] = Global("out", out_bits, True)
    G["out_lse"] = Global("out_lse", out_lse, True)
    if P.num_splits > 1:
        G["partial_out"] = Global("partial_out", np.full(P.num_splits * B * Hq * Dv, np.nan, F32), True)
        G["partial_lse"] = Global("partial_lse", np.full(P.num_splits * B * Hq, np.nan, F32), True)
    errors = []
    for bz in range(Hkv):
        for by in range(B):
            for bx in range(P.head_tiles * P.num_splits):
                sm = flash_decode_cta(cfg, T, kv_fp8, P, G, (bx, by, bz), stats)
                errors += [f"CTA {(bx, by, bz)}: {e}" for e in sm.errors]
    if P.num_splits > 1:
        # every partial row: lse always written; out written only for non-empty splits (others must not be read)
        wl = G["partial_lse"].written.reshape(-1, 4)
        if not (wl == 1).all():
            errors.append(f"partial_lse written {np.unique(wl)} times")
        M = Params()
        M.num_parts, M.num_heads, M.head_dim, M.num_rows = P.num_splits, Hq, Dv, B * Hq
        M.out_stride_part, M.out_stride_batch, M.out_stride_head, M.out_stride_dim = B * Hq * Dv, Hq * Dv, Dv, 1
        M.lse_stride_part, M.lse_stride_batch, M.lse_stride_head = B * Hq, Hq, 1
        merge_states_emulated(M, G, T)
        po = G["partial_out"].written.reshape(-1, 4)
        if (po > 1).any():
            errors.append("partial_out bytes written twice")
    wo = G["out"].written
    if not (wo == 1).all():
        errors.append(f"out bytes written {np.unique(wo)} times (expected exactly once each)")
    wl = G["out_lse"].written
    if not (wl == 1).all():
        errors.append(f"out_lse bytes written {np.unique(wl)} times (expected exactly once each)")
    if race_report is not None:
        race_report.extend(errors)
    out = torch.from_numpy(T.to_f32(out_bits).reshape(B, Hq, Dv)).to(T.torch)
    return out, torch.from_numpy(out_lse.reshape(B, Hq).copy()), errors


# ----------------------------------------------------------------------------- test driver
class Case:
    """Like tests/test_flash_decode.py's Case: shuffled blocks, out-of-range ids past each length."""

    def __init__(self, seq_lens, num_q_heads, num_kv_heads, head_dim_k, head_dim_v=None, *, block_size=16,
                 q_dtype=torch.bfloat16, fp8=False, mla=False, strided=False, gen=None):
        g = gen
        head_dim_v = head_dim_v or head_dim_k
        batch = len(seq_lens)
        blocks_per_seq = [math.ceil(length / block_size) for length in seq_lens]
        max_blocks = max(blocks_per_seq + [1]) + 1
        num_blocks = sum(blocks_per_seq) + 3
        order = torch.randperm(num_blocks, generator=g)
        table = torch.randint(num_blocks, num_blocks + 1000, (batch, max_blocks), generator=g)
        start = 0
        for b, count in enumerate(blocks_per_seq):
            table[b, :count] = order[start:start + count]
            start += count
        kv_dtype = torch.float8_e4m3fn if fp8 else q_dtype
        if strided:  # q rows and cache heads padded: non-contiguous views
            self.q = torch.randn(batch, num_q_heads, head_dim_k + 8, generator=g).to(q_dtype)[..., 8:]
            kc = torch.randn(num_blocks, block_size, num_kv_heads + 1, head_dim_k + 16, generator=g).to(kv_dtype)
            self.k_cache = kc[:, :, 1:, 16:]
            if not mla:
                vc = torch.randn(num_blocks, block_size, num_kv_heads, head_dim_v + 32, generator=g).to(kv_dtype)
                self.v_cache = vc[..., :head_dim_v]
            else:
                self.v_cache = None
            self.block_table = torch.cat([table, table], 1).to(torch.int32)[:, ::2]
            self.block_table[:] = table.to(torch.int32)
        else:
            self.q = torch.randn(batch, num_q_heads, head_dim_k, generator=g).to(q_dtype)
            self.k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim_k, generator=g).to(kv_dtype)
            self.v_cache = None if mla else torch.randn(num_blocks, block_size, num_kv_heads, head_dim_v,
                                                        generator=g).to(kv_dtype)
            self.block_table = table.to(torch.int32)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
        self.softmax_scale = head_dim_k ** -0.5
        self.head_dim_v = head_dim_v if mla else -1
        self.k_scale = torch.tensor(0.5 + torch.rand((), generator=g).item()) if fp8 else None
        self.v_scale = torch.tensor(0.5 + torch.rand((), generator=g).item()) if fp8 and not mla else None

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_table, self.seq_lens, self.softmax_scale,
                self.head_dim_v, self.k_scale, self.v_scale)


def check_case(case, config, num_splits):
    from tolerance import assert_close_to_reference
    stats = {}
    out, lse, errors = flash_decode_emulated(*case.args(), num_splits=num_splits, config=config, stats=stats)
    ref_out, ref_lse = flash_decode_reference(*case.args(), out_dtype=torch.float64)
    base_out, base_lse = flash_decode_reference(*case.args(), compute_dtype=torch.float32,
                                                probability_dtype=case.q.dtype)
    terms = max(1, int(case.seq_lens.max()))
    result = {"errors": list(errors), "stats": stats}
    fin = torch.isfinite(ref_out)
    result["out_err"] = (out.double() - ref_out).abs()[fin].max().item() if fin.any() else 0.0
    result["base_out_err"] = (base_out.double() - ref_out).abs()[fin].max().item() if fin.any() else 0.0
    finl = torch.isfinite(ref_lse)
    result["lse_err"] = (lse.double() - ref_lse).abs()[finl].max().item() if finl.any() else 0.0
    for name, a, r, bsl in (("out", out, ref_out, base_out), ("lse", lse, ref_lse, base_lse)):
        try:
            assert_close_to_reference(a, r, bsl, accumulated_terms=terms, name=name)
        except AssertionError as e:
            result["errors"].append(str(e))
    empty = case.seq_lens == 0
    if not (torch.all(out[empty] == 0) and torch.all(lse[empty] == float("-inf"))):
        result["errors"].append("empty sequences: out != 0 or lse != -inf")
    return result


LENGTHS = [0, 1, 15, 63, 64, 65, 200]


def run_suite(configs, quick=False, seed=0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    summary = []
    for name in configs:
        cfg = CONFIGS[name]
        groups = [1, 16, 20, 128] if name == "mla" else [1, 3, 16, 20]
        Hkv_for = {1: 2, 3: 2, 16: 1, 20: 2, 128: 1}
        combos = list(itertools.product(groups, [False, True], [1, 16, 64], [1, 2, 5]))
        if quick:
            combos = combos[::7]
        worst = {}
        for n_case, (group, fp8, block_size, splits) in enumerate(combos):
            q_dtype = torch.bfloat16 if n_case % 2 == 0 else torch.float16
            Hkv = Hkv_for[group]
            case = Case(LENGTHS, group * Hkv, Hkv, cfg.DK, cfg.DV, block_size=block_size, q_dtype=q_dtype,
                        fp8=fp8, mla=cfg.SHARED_KV, strided=(n_case % 5 == 4), gen=gen)
            t0 = time.time()
            res = check_case(case, name, splits)
            dt = time.time() - t0
            tag = (f"{name} group={group} Hkv={Hkv} fp8={fp8} bs={block_size} splits={splits} "
                   f"{'bf16' if q_dtype == torch.bfloat16 else 'fp16'}{' strided' if n_case % 5 == 4 else ''}")
            status = "OK " if not res["errors"] else "FAIL"
            line = (f"{status} {tag}: out_err={res['out_err']:.3e} (torch-fp32 baseline {res['base_out_err']:.3e}) "
                    f"lse_err={res['lse_err']:.3e} ctas={res['stats']['ctas']} empty={res['stats']['empty_ctas']} "
                    f"clamped_ids={res['stats']['clamped_block_ids']} [{dt:.1f}s]")
            print(line, flush=True)
            for e in res["errors"][:6]:
                print("     ", e, flush=True)
            summary.append((name, tag, res))
            key = ("fp8" if fp8 else "16bit")
            w = worst.setdefault(key, [0.0, 0.0, 0.0])
            w[0] = max(w[0], res["out_err"])
            w[1] = max(w[1], res["lse_err"])
            w[2] = max(w[2], res["base_out_err"])
        for key, (eo, el, eb) in worst.items():
            print(f"== {name} {cfg} {key}: max out err {eo:.3e} (baseline {eb:.3e}), max lse err {el:.3e}")
    fails = [s for s in summary if s[2]["errors"]]
    print(f"TOTAL {len(summary)} cases, {len(fails)} failing")
    return summary


def smem_report():
    for name, cfg in CONFIGS.items():
        for fp8 in (False, True):
            b = cfg.smem_bytes(fp8)
            print(f"{name:5s} fp8={fp8!s:5s} threads={cfg.kThreads} smem={b} B ({b / 1024:.1f} KiB) "
                  f"pipeline={cfg.pipeline_bytes(fp8)} epilogue={cfg.epilogue_bytes()} "
                  f"<= 227 KiB: {b <= 227 * 1024}  <= 163 KiB (A100): {b <= 163 * 1024}")


if __name__ == "__main__":
    which = sys.argv[1:] or ["d64", "d128", "d256", "mla"]
    if which == ["smem"]:
        smem_report()
    else:
        quick = "quick" in which
        which = [w for w in which if w != "quick"]
        run_suite(which, quick=quick)
