"""The emulated mma.sync and ldmatrix against an independent statement of their fragments: the
thread-value layouts CUTLASS cute documents for SM80_16x8x16_F32BF16BF16F32_TN (include/cute/atom/
mma_traits_sm80.hpp) and for SM75_U32x4_LDSM_N / SM75_U16x8_LDSM_T (copy_traits_sm75.hpp),
written down here as data (shapes and strides). A layout maps (thread, value) to an index:
column-major m + M * k for A (M x K), n + N * k for B (N x K), m + M * n for C (M x N); for
ldmatrix to a bit of the 32 x 128-bit source, where source thread s holds the row lane s points at."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.simt

# (shape, stride) of the thread mode and of the value mode.
MMA_A = (((4, 8), (32, 1)), ((2, 2, 2), (16, 8, 128)))
MMA_B = (((4, 8), (16, 1)), ((2, 2), (8, 64)))
MMA_C = (((4, 8), (32, 1)), ((2, 2), (16, 8)))
LDSM_N = (((32,), (32,)), ((32, 4), (1, 1024)))
LDSM_T = (((4, 8), (256, 16)), ((16, 2, 4), (1, 128, 1024)))


def evaluate(mode, coordinate):
    """A cute layout mode at a 1-D coordinate (colexicographic: the first extent is fastest)."""
    shape, stride = mode
    index = 0
    for extent, step in zip(shape, stride):
        index += (coordinate % extent) * step
        coordinate //= extent
    return index


def layout(tv, thread, value):
    return evaluate(tv[0], thread) + evaluate(tv[1], value)


def halves_to_word(low: int, high: int) -> int:
    word = (low & 0xFFFF) | ((high & 0xFFFF) << 16)
    return word - (1 << 32) if word >= 1 << 31 else word  # as int32


def bits16(values: torch.Tensor) -> list[int]:
    return values.contiguous().view(torch.int16).to(torch.int32).bitwise_and(0xFFFF).tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mma_m16n8k16_matches_cute_layouts(dtype):
    a = torch.randn(16, 16).to(dtype)
    b = torch.randn(16, 8).to(dtype)  # K x N
    c = torch.randn(16, 8)
    a_bits, b_bits = bits16(a.reshape(-1)), bits16(b.reshape(-1))
    a_regs = torch.zeros(32, 4, dtype=torch.int32)
    b_regs = torch.zeros(32, 2, dtype=torch.int32)
    c_regs = torch.zeros(32, 4)
    for t in range(32):
        a_values, b_values = [], []
        for v in range(8):
            index = layout(MMA_A, t, v)
            m, k = index % 16, index // 16
            a_values.append(a_bits[m * 16 + k])
        for v in range(4):
            index = layout(MMA_B, t, v)
            n, k = index % 8, index // 8
            b_values.append(b_bits[k * 8 + n])
        for r in range(4):
            a_regs[t, r] = halves_to_word(a_values[2 * r], a_values[2 * r + 1])
        for r in range(2):
            b_regs[t, r] = halves_to_word(b_values[2 * r], b_values[2 * r + 1])
        for v in range(4):
            index = layout(MMA_C, t, v)
            c_regs[t, v] = c[index % 16, index // 16]
    d_regs = torch.ops.helix_simt.probe_mma(a_regs, b_regs, c_regs, dtype == torch.bfloat16)
    d = torch.full((16, 8), float("nan"), dtype=torch.float64)
    for t in range(32):
        for v in range(4):
            index = layout(MMA_C, t, v)
            assert math.isnan(d[index % 16, index // 16]), "the C layout covers each element once"
            d[index % 16, index // 16] = d_regs[t, v].item()
    expected = (a.double() @ b.double() + c.double()).float().double()
    torch.testing.assert_close(d, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("transposed", [False, True], ids=["x4", "x4.trans"])
def test_ldmatrix_matches_cute_layouts(transposed):
    rows = torch.randint(-(1 << 15), 1 << 15, (32, 8), dtype=torch.int32).to(torch.int16)
    fragments = torch.ops.helix_simt.probe_ldmatrix(rows, transposed)
    tv = LDSM_T if transposed else LDSM_N
    row_bits = rows.to(torch.int32).bitwise_and(0xFFFF)
    fragment_bits = fragments.to(torch.int64).bitwise_and(0xFFFFFFFF)
    for t in range(32):
        for register in range(4):
            for half in range(2):
                # The value index of bit 0 of 16-bit element `half` of `register`.
                value = 16 * half + 32 * register if not transposed else 16 * (half + 2 * register)
                bit = layout(tv, t, value)
                source_row, element = bit // 128, (bit % 128) // 16
                got = (int(fragment_bits[t, register]) >> (16 * half)) & 0xFFFF
                assert got == int(row_bits[source_row, element]), (t, register, half)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16x2", "bf16x2"])
def test_fp8_pair_widening_is_exact_for_every_pair(dtype):
    # cvt.rn.f16x2.e4m3x2 (PTX ISA 9.7.9.21): the low byte lands in the low half. Every E4M3
    # value is exact in fp16 and bf16, so each half must equal torch's conversion, NaN for NaN.
    pairs = torch.arange(1 << 16, dtype=torch.int32)
    words = torch.ops.helix_simt.probe_widen_fp8(pairs, dtype == torch.bfloat16)
    for half in range(2):
        codes = ((pairs >> (8 * half)) & 0xFF).to(torch.uint8).view(torch.float8_e4m3fn)
        expected = codes.to(dtype).float()
        bits = ((words >> (16 * half)) & 0xFFFF).to(torch.int32)
        got = (bits.to(torch.int16).view(dtype)).float()
        nan = torch.isnan(expected)
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(got[~nan], expected[~nan])
