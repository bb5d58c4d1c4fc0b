"""FP4 ops: quantize_fp4 / dequantize_fp4 (NVFP4, MXFP4) and fp4_grouped_gemm, against the
independent references of helix_ext.reference, on CPU and (where present) CUDA."""

from __future__ import annotations

import pytest
import torch

import helix_ext
from helix_ext.reference import (CANONICAL_NAN_BITS, E2M1_GRID, SAME_SIZE_INT, dequantize_fp4_reference,
                                 e2m1_decode, fp4_grouped_gemm_reference, fp4_pack, fp4_unpack,
                                 quantize_fp4_reference)
from conftest import DEVICES, DEVICES_AND_SIMT, call_op, tensor_device
from tolerance import assert_close_to_reference

FORMATS = ["nvfp4", "mxfp4"]
BLOCK = {"nvfp4": 16, "mxfp4": 32}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.cpu().reshape(-1).view(torch.uint8), b.cpu().reshape(-1).view(torch.uint8))


def quantize_and_compare(x: torch.Tensor, fmt: str, global_scale: torch.Tensor | None = None, device: str | None = None):
    packed, scales, global_out = call_op(device or x.device.type, "quantize_fp4", x, fmt, global_scale)
    ref_packed, ref_scales, ref_global = quantize_fp4_reference(x.cpu(), fmt,
                                                                None if global_scale is None else global_scale.cpu())
    assert packed.dtype == torch.uint8 and packed.shape == (x.shape[0], x.shape[1] // 2)
    assert scales.shape == (x.shape[0], x.shape[1] // BLOCK[fmt])
    assert scales.dtype == (torch.float8_e4m3fn if fmt == "nvfp4" else torch.uint8)
    assert global_out.dtype == torch.float32 and global_out.shape == ()
    assert same_bits(packed, ref_packed), "packed codes differ from the reference"
    assert same_bits(scales, ref_scales), "block scales differ from the reference"
    assert same_bits(global_out, ref_global.float()), f"global scale {global_out.item()} != {ref_global.item()}"
    return packed, scales, global_out


# ------------------------------------------------------------------------------- codecs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_code_in_both_nibbles_decodes_exactly(device, fmt):
    # All 256 bytes: element 2i from the low nibble, 2i+1 from the high nibble, scale 1.
    block = BLOCK[fmt]
    packed = torch.arange(256, dtype=torch.uint8).view(-1, block // 2).repeat(1, 1).to(device)
    rows = packed.shape[0]
    if fmt == "nvfp4":
        scales = torch.ones(rows, 1).to(torch.float8_e4m3fn).to(device)
    else:
        scales = torch.full((rows, 1), 127, dtype=torch.uint8, device=device)
    out = helix_ext.dequantize_fp4(packed, scales, torch.tensor(1.0, device=device), fmt, torch.float32).cpu()
    grid = torch.tensor(E2M1_GRID)
    expected = []
    for byte in range(256):
        for nibble in (byte & 0xF, byte >> 4):
            value = grid[nibble & 7].item()
            expected.append(-value if nibble & 8 else value)
    assert torch.equal(out.flatten(), torch.tensor(expected))


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_even_and_large_values_saturate(device):
    # global_scale 1 and a block amax of 6 make the block scale exactly 1 (e4m3 code 0x38).
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]
    x = torch.tensor([ties + [-t for t in ties]], device=device)
    packed, scales, _ = quantize_and_compare(x, "nvfp4", torch.tensor(1.0, device=device))
    assert scales.cpu().view(torch.uint8).flatten().tolist() == [0x38]
    out = helix_ext.dequantize_fp4(packed, scales, torch.tensor(1.0, device=device), "nvfp4", torch.float32)
    assert out.cpu().flatten().tolist() == expected + [-e if e else 0.0 for e in expected]
    # A calibrated global scale far too small for the data clamps the block scale to 448:
    # values then saturate at +-6 * 448 * global.
    global_scale = torch.tensor(1e-3, device=device)
    x = torch.tensor([[10.0, -10.0, 1.0, 0.1] * 4], device=device)
    packed, scales, _ = quantize_and_compare(x, "nvfp4", global_scale)
    out = helix_ext.dequantize_fp4(packed, scales, global_scale, "nvfp4", torch.float32).cpu()
    assert out[0, 0].item() == pytest.approx(6 * 448 * 1e-3) and out[0, 1].item() == pytest.approx(-6 * 448 * 1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("power", [-120, -20, -1, 0, 3, 40, 120])
def test_mxfp4_powers_of_two_are_exact(device, power):
    # A block whose amax is 6 * 2^(p-2) (floor(log2) = p) takes the scale 2^(p-2), and every
    # grid value times that scale round-trips exactly.
    scale = 2.0 ** (power - 2)
    values = torch.tensor(list(E2M1_GRID[1:]) + [-v for v in E2M1_GRID[1:]] + [0.0] * 18, dtype=torch.float64)
    x = (values * scale).float().view(1, 32).to(device)
    packed, scales, _ = quantize_and_compare(x, "mxfp4")
    assert scales.cpu().item() == power - 2 + 127
    out = helix_ext.dequantize_fp4(packed, scales, torch.tensor(1.0, device=device), "mxfp4", torch.float32)
    assert torch.equal(out.cpu(), x.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_zeros_huge_and_nan_inputs_make_no_nan(device, fmt):
    block = BLOCK[fmt]
    zeros = torch.zeros(3, 2 * block, device=device)
    packed, scales, global_scale = quantize_and_compare(zeros, fmt)
    assert global_scale.item() == 1.0 and torch.all(packed == 0)
    expected_scale = 0x01 if fmt == "nvfp4" else 0  # the smallest scale: 2^-9 (e4m3) or 2^-127 (e8m0)
    assert torch.all(scales.cpu().view(torch.uint8) == expected_scale)
    assert torch.all(helix_ext.dequantize_fp4(packed, scales, global_scale, fmt, torch.float32) == 0)
    huge = torch.randn(4, 2 * block, device=device).clamp(-1, 1) * 3e38  # finite, near the fp32 limit
    huge[0, :block] = 0.0  # an all-zero block next to huge ones
    packed, scales, global_scale = quantize_and_compare(huge, fmt)
    out = helix_ext.dequantize_fp4(packed, scales, global_scale, fmt, torch.float32)
    assert torch.isfinite(out).all() and torch.all(out[0, :block] == 0)
    with_nan = torch.randn(2, block, device=device)
    with_nan[0, 3] = float("nan")
    packed, scales, global_scale = quantize_and_compare(with_nan, fmt)
    out = helix_ext.dequantize_fp4(packed, scales, global_scale, fmt, torch.float32)
    assert torch.isfinite(out).all() and out[0, 3].item() == 0.0  # NaN quantizes to code 0


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_random_round_trip_matches_reference_bits(device, fmt, dtype):
    # Rows spanning twelve orders of magnitude (eight in fp16's range); every code must be the
    # reference's nearest grid point (bit-exact), and dequantization exact to the reference.
    decades = 4 if dtype == torch.float16 else 6
    backend, device = device, tensor_device(device)
    x = (torch.randn(53, 256).clamp(-4, 4) * torch.logspace(-decades, decades, 53).unsqueeze(1)).to(dtype).to(device)
    packed, scales, global_scale = quantize_and_compare(x, fmt, device=backend)
    for out_dtype in DTYPES:
        out = call_op(backend, "dequantize_fp4", packed, scales, global_scale, fmt, out_dtype)
        expected = dequantize_fp4_reference(packed.cpu(), scales.cpu(), global_scale.cpu(), fmt, out_dtype)
        assert out.dtype == out_dtype and same_bits(out, expected)
    # Nearest grid point: the error is at most half the gap at that magnitude (<= 1/3 of |x|,
    # plus the block's smallest step).
    decoded = dequantize_fp4_reference(packed.cpu(), scales.cpu(), global_scale.cpu(), fmt).double()
    error = (decoded - x.cpu().double()).abs()
    step = dequantize_fp4_reference(torch.full_like(packed.cpu(), 0x11), scales.cpu(), global_scale.cpu(), fmt)
    assert torch.all(error <= x.cpu().double().abs() / 3 + step.double().abs() / 2 + 1e-30)


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
def test_calibrated_global_scale_is_used(device):
    backend, device = device, tensor_device(device)
    x = torch.randn(8, 64, device=device)
    given = torch.tensor(0.01, device=device)
    packed, scales, global_scale = quantize_and_compare(x, "nvfp4", given, device=backend)
    assert global_scale.item() == pytest.approx(0.01) and global_scale.data_ptr() != given.data_ptr()


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_infinities_saturate_and_leave_other_rows_alone(device, fmt, dtype):
    # +-inf quantizes like +-FLT_MAX in its block (code +-6 at that block's scale) and stays out
    # of NVFP4's tensor amax: the global scale and every row without an inf are unchanged.
    backend, device = device, tensor_device(device)
    block = BLOCK[fmt]
    x = torch.randn(5, 4 * block).to(dtype)
    x[1, 3] = 50.0  # the finite amax, in a row without an inf
    x[0, 2], x[0, block + 1], x[3, 0] = float("inf"), float("-inf"), float("nan")
    x = x.to(device)
    packed, scales, global_scale = quantize_and_compare(x, fmt, device=backend)
    rest = call_op(backend, "quantize_fp4", x[1:].clone(), fmt)
    assert same_bits(global_scale, rest[2]), "an inf changed the global scale"
    assert same_bits(packed[1:], rest[0]) and same_bits(scales[1:], rest[1]), "an inf changed rows without one"
    out = call_op(backend, "dequantize_fp4", packed, scales, global_scale, fmt, torch.float32).cpu()
    assert torch.isfinite(out).all(), "inf must saturate to a finite code, NaN quantize to 0"
    largest = 6.0 * (448.0 * global_scale.item() if fmt == "nvfp4" else 2.0 ** 125)
    assert out[0, 2].item() == pytest.approx(largest) and out[0, block + 1].item() == pytest.approx(-largest)
    assert out[3, 0].item() == 0.0


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
def test_nvfp4_global_scale_is_never_zero(device):
    # amax / 2688 underflows to 0 for amax below ~4e-42: the global scale is then 1.0 (as for
    # an all-zero tensor), which fp4_grouped_gemm accepts, never 0, which it must reject.
    backend, device = device, tensor_device(device)
    x = torch.zeros(2, 32)
    x[0, 5], x[1, 7] = 1e-43, -3e-44  # fp32 subnormals
    packed, scales, global_scale = quantize_and_compare(x.to(device), "nvfp4", device=backend)
    assert global_scale.item() == 1.0
    y = call_op(backend, "fp4_grouped_gemm", torch.randn(3, 32).bfloat16().to(device), packed.unsqueeze(0),
                scales.unsqueeze(0), global_scale.reshape(1), torch.tensor([3], dtype=torch.int32, device=device),
                "nvfp4")
    assert torch.all(y == 0)


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nan_scale_codes_dequantize_to_the_canonical_nan(device, fmt, dtype):
    # e4m3 0x7F / 0xFF and e8m0 0xFF are NaN: every element of such a block, positive or
    # negative code, dequantizes to the dtype's canonical quiet NaN, on every device.
    backend, device = device, tensor_device(device)
    block = BLOCK[fmt]
    packed = torch.randint(0, 256, (3, 2 * block), dtype=torch.uint8)
    if fmt == "nvfp4":
        codes = torch.tensor([[0x7F, 0x38, 0xFF, 0x40]] * 3, dtype=torch.uint8)
        scales, nan_blocks = codes.view(torch.float8_e4m3fn), [0, 2]
    else:
        scales, nan_blocks = torch.tensor([[0xFF, 127, 0xFF, 120]] * 3, dtype=torch.uint8), [0, 2]
    out = call_op(backend, "dequantize_fp4", packed.to(device), scales.to(device), torch.tensor(0.5, device=device),
                  fmt, dtype).cpu()
    expected = dequantize_fp4_reference(packed, scales, torch.tensor(0.5), fmt, dtype)
    assert same_bits(out, expected)
    bits = out.view(SAME_SIZE_INT[dtype]).view(3, -1, block).long() & (0xFFFFFFFF if dtype == torch.float32 else 0xFFFF)
    for b in range(out.shape[1] // block):
        nan = torch.all(bits[:, b] == CANONICAL_NAN_BITS[dtype])
        assert bool(nan) == (b in nan_blocks), b


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
def test_mxfp4_scale_code_zero_is_2_pow_minus_127_in_the_gemm(device):
    # E8M0 code 0 is 2^-127 (the codec's and the OCP spec's value; a bf16 subnormal), not 0:
    # with activations near 2^100 the products are ordinary numbers the GEMM must get right.
    backend, device = device, tensor_device(device)
    n, k = 16, 64
    codes = torch.randint(0, 256, (1, n, k // 2), dtype=torch.uint8)
    scales = torch.zeros(1, n, k // 32, dtype=torch.uint8)
    x = (torch.randn(4, k) * 2.0 ** 100).bfloat16()
    offs = torch.tensor([4], dtype=torch.int32)
    args = [x, codes, scales, torch.ones(1), offs]
    y = call_op(backend, "fp4_grouped_gemm", *[a.to(device) for a in args], "mxfp4")
    reference = fp4_grouped_gemm_reference(*args, "mxfp4", out_dtype=torch.float64)
    baseline = fp4_grouped_gemm_reference(*args, "mxfp4", compute_dtype=torch.float32)
    assert reference.abs().max() > 1e-9  # 2^100 * 6 * 2^-127 * 64 terms: far from 0
    assert_close_to_reference(y, reference, baseline, accumulated_terms=k, name="y")
    dense = helix_ext.dequantize_fp4(codes[0], scales[0], torch.tensor(1.0), "mxfp4", torch.float32)
    assert dense.abs().max() > 0 and dense.abs().max() <= 6 * 2.0 ** -127


def test_pack_layout_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    assert fp4_pack(codes).tolist() == [[0x21, 0x43]]
    assert torch.equal(fp4_unpack(fp4_pack(codes)), codes)
    assert e2m1_decode(torch.tensor([0x7, 0xF, 0x1])).tolist() == [6.0, -6.0, 0.5]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_and_cuda_are_bit_identical(fmt, dtype):
    x = (torch.randn(300, 512) * torch.logspace(-4, 4, 300).unsqueeze(1)).to(dtype)
    cpu = helix_ext.quantize_fp4(x, fmt)
    cuda = helix_ext.quantize_fp4(x.cuda(), fmt)
    for a, b in zip(cpu, cuda):
        assert same_bits(a, b)
    for out_dtype in DTYPES:
        assert same_bits(helix_ext.dequantize_fp4(*cpu, fmt, out_dtype),
                         helix_ext.dequantize_fp4(*cuda, fmt, out_dtype))


# ------------------------------------------------------------------------ grouped GEMM


def make_experts(num_experts: int, n: int, k: int, fmt: str, device: str):
    """Per-expert quantized weights [E, N, K/2], scales [E, N, K/bs], global scales [E]."""
    parts = [quantize_fp4_reference(torch.randn(n, k) * (0.5 + e % 3), fmt) for e in range(num_experts)]
    w = torch.stack([p[0] for p in parts]).to(device)
    scales = torch.stack([p[1] for p in parts]).to(device)
    global_scales = torch.stack([p[2] for p in parts]).float().to(device)
    return w, scales, global_scales


def check_grouped_gemm(group_sizes, n, k, fmt, device, extra_rows=0):
    backend, device = device, tensor_device(device)
    num_experts = len(group_sizes)
    w, scales, global_scales = make_experts(num_experts, n, k, fmt, device)
    tokens = sum(group_sizes) + extra_rows
    x = torch.randn(tokens, k).bfloat16().to(device)
    offs = torch.tensor(group_sizes, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    y = call_op(backend, "fp4_grouped_gemm", x, w, scales, global_scales, offs, fmt)
    assert y.shape == (tokens, n) and y.dtype == torch.bfloat16 and y.device == x.device
    cpu = [t.cpu() for t in (x, w, scales, global_scales, offs)]
    reference = fp4_grouped_gemm_reference(*cpu, fmt, out_dtype=torch.float64)
    baseline = fp4_grouped_gemm_reference(*cpu, fmt, compute_dtype=torch.float32)
    assert_close_to_reference(y, reference, baseline, accumulated_terms=k, name="y")
    assert torch.all(y[sum(group_sizes):] == 0), "rows past offs[-1] must be zero"
    return y


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("group_sizes", [[5, 0, 9, 1], [0, 0, 0, 0], [17]], ids=["5-0-9-1", "all-empty", "one-17"])
def test_grouped_gemm_group_patterns(device, fmt, group_sizes):
    check_grouped_gemm(group_sizes, n=96, k=256, fmt=fmt, device=device, extra_rows=3)


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("fmt", FORMATS)
def test_grouped_gemm_256_tiny_groups(device, fmt):
    sizes = torch.randint(0, 4, (256,)).tolist()
    check_grouped_gemm(sizes, n=64, k=128, fmt=fmt, device=device)


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k", [32, 96, 160, 1056])
def test_grouped_gemm_k_not_a_multiple_of_the_tile(device, fmt, k):
    check_grouped_gemm([3, 8], n=40, k=k, fmt=fmt, device=device)


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
def test_grouped_gemm_nvfp4_k_an_odd_multiple_of_16(device):
    check_grouped_gemm([2, 5], n=24, k=208, fmt="nvfp4", device=device)


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("fmt", FORMATS)
def test_grouped_gemm_dense_and_prefill_sizes(device, fmt):
    check_grouped_gemm([1], n=200, k=512, fmt=fmt, device=device)  # a dense shard, one token
    check_grouped_gemm([150, 70], n=72, k=256, fmt=fmt, device=device)  # prefill-sized groups


def grouped_gemm_bad_inputs(device):
    w, scales, global_scales = make_experts(3, 16, 64, "nvfp4", device)
    x = torch.randn(10, 64, device=device).bfloat16()
    offs = torch.tensor([2, 5, 9], dtype=torch.int32, device=device)
    return [
        ("decreasing offs", (x, w, scales, global_scales, torch.tensor([2, 1, 9], dtype=torch.int32, device=device)),
         r"offs must be non-decreasing.*offs\[1\] = 1"),
        ("offs beyond T", (x, w, scales, global_scales, torch.tensor([2, 5, 11], dtype=torch.int32, device=device)),
         r"offs\[2\] = 11 exceeds T = 10"),
        ("E mismatch (offs)", (x, w, scales, global_scales, offs[:2]), r"offs must be an int32 tensor \[E\] = \[3\]"),
        ("E mismatch (scales)", (x, w, scales[:2], global_scales, offs), r"w_scales must be \[E, N, K/16\]"),
        ("N mismatch", (x, w, scales[:, :8], global_scales, offs), r"w_scales must be \[E, N, K/16\]"),
        ("K mismatch", (x[:, :32], w, scales, global_scales, offs), r"w's last dim \(32\) must be K/2 = 16"),
        ("K not a multiple of the block", (x[:, :40], w, scales, global_scales, offs), r"multiple of the nvfp4 block"),
        ("global scales shape", (x, w, scales, global_scales[:1], offs), r"w_global_scale must be a float32 tensor \[E\]"),
        ("x dtype", (x.float(), w, scales, global_scales, offs), r"x must be a 2-D bfloat16 tensor"),
        ("scale dtype", (x, w, scales.view(torch.uint8), global_scales, offs), r"w_scales must be"),
        ("int64 offs", (x, w, scales, global_scales, offs.long()), r"offs must be an int32 tensor"),
    ]


VALUE_CHECKS = ("decreasing offs", "offs beyond T")


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_gemm_bad_inputs(device, monkeypatch):
    monkeypatch.setenv("HELIX_CHECK_INPUTS", "1")
    for label, args, message in grouped_gemm_bad_inputs(device):
        with pytest.raises(RuntimeError, match=message):
            helix_ext.fp4_grouped_gemm(*args, "nvfp4")
        if label in VALUE_CHECKS:
            continue
        with pytest.raises(RuntimeError, match=message), torch._subclasses.FakeTensorMode() as mode:
            torch.ops.helix.fp4_grouped_gemm.default(*[mode.from_tensor(a) for a in args], "nvfp4")


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_bad_inputs(device, monkeypatch):
    monkeypatch.setenv("HELIX_CHECK_INPUTS", "1")  # value checks on CUDA too
    x = torch.randn(4, 64, device=device)
    cases = [
        ((x[:, :40], "nvfp4"), {}, r"x's K \(40\) must be a multiple of the nvfp4 block \(16\)"),
        ((x[:, :48], "mxfp4"), {}, r"multiple of the mxfp4 block \(32\)"),
        ((x, "fp4"), {}, r'fmt must be "nvfp4" or "mxfp4"'),
        ((x[0], "nvfp4"), {}, r"x must be 2-D"),
        ((x.double(), "nvfp4"), {}, r"x must be bfloat16, float16 or float32"),
        ((x, "mxfp4"), {"global_scale": torch.tensor(1.0, device=device)}, r"global_scale applies to nvfp4 only"),
        ((x, "nvfp4"), {"global_scale": torch.ones(2, device=device)}, r"global_scale must be a float32 tensor with one"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(RuntimeError, match=message):
            helix_ext.quantize_fp4(*args, **kwargs)
    packed, scales, global_scale = helix_ext.quantize_fp4(x, "nvfp4")
    for bad in (0.0, float("inf"), -1.0, float("nan")):
        with pytest.raises(RuntimeError, match=r"global_scale = .* must be finite and positive"):
            helix_ext.quantize_fp4(x, "nvfp4", torch.tensor(bad, device=device))
        with pytest.raises(RuntimeError, match=r"dequantize_fp4: global_scale = .* must be finite and positive"):
            helix_ext.dequantize_fp4(packed, scales, torch.tensor(bad, device=device), "nvfp4")
    with pytest.raises(RuntimeError, match=r"block_scales must be Float8_e4m3fn for nvfp4"):
        helix_ext.dequantize_fp4(packed, scales.view(torch.uint8), global_scale, "nvfp4")
    with pytest.raises(RuntimeError, match=r"block_scales must be \[M, K/16\]"):
        helix_ext.dequantize_fp4(packed, scales[:, :2], global_scale, "nvfp4")
    with pytest.raises(RuntimeError, match=r"dtype must be bfloat16, float16 or float32"):
        helix_ext.dequantize_fp4(packed, scales, global_scale, "nvfp4", torch.int32)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(8, 64, device=device).bfloat16()
    for fmt in FORMATS:
        torch.library.opcheck(torch.ops.helix.quantize_fp4.default, (x, fmt))
    packed, scales, global_scale = helix_ext.quantize_fp4(x, "mxfp4")
    torch.library.opcheck(torch.ops.helix.dequantize_fp4.default, (packed, scales, global_scale, "mxfp4", torch.float32))
    w, w_scales, w_global = make_experts(2, 16, 64, "mxfp4", device)
    offs = torch.tensor([3, 8], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.helix.fp4_grouped_gemm.default, (x, w, w_scales, w_global, offs, "mxfp4"))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device):
    torch._dynamo.reset()
    w, w_scales, w_global = make_experts(2, 16, 64, "nvfp4", device)
    offs = torch.tensor([3, 8], dtype=torch.int32, device=device)

    def step(x):
        packed, scales, global_scale = helix_ext.quantize_fp4(x, "nvfp4")
        restored = helix_ext.dequantize_fp4(packed, scales, global_scale, "nvfp4", torch.bfloat16)
        return helix_ext.fp4_grouped_gemm(restored, w, w_scales, w_global, offs, "nvfp4").float() * 2

    x = torch.randn(8, 64, device=device).bfloat16()
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(x), step(x), rtol=0, atol=0)


@pytest.mark.gpu
def test_grouped_gemm_cuda_graph_capture():
    sizes = [4, 0, 7, 2]
    w, scales, global_scales = make_experts(4, 128, 256, "nvfp4", "cuda")
    x = torch.randn(16, 256, device="cuda").bfloat16()
    offs = torch.tensor(sizes, dtype=torch.int32).cumsum(0).to(torch.int32).cuda()
    helix_ext.fp4_grouped_gemm(x, w, scales, global_scales, offs, "nvfp4")  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = helix_ext.fp4_grouped_gemm(x, w, scales, global_scales, offs, "nvfp4")
    for new_sizes in ([1, 1, 1, 1], [0, 13, 0, 3], [16, 0, 0, 0]):
        x.copy_(torch.randn_like(x))
        offs.copy_(torch.tensor(new_sizes, dtype=torch.int32).cumsum(0))
        graph.replay()
        torch.cuda.synchronize()
        expected = helix_ext.fp4_grouped_gemm(x, w, scales, global_scales, offs, "nvfp4")
        torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_gemm_with_k_zero(device):
    x = torch.empty(4, 0, device=device, dtype=torch.bfloat16)
    w = torch.empty(2, 40, 0, device=device, dtype=torch.uint8)
    scales = torch.empty(2, 40, 0, device=device, dtype=torch.uint8)
    y = helix_ext.fp4_grouped_gemm(x, w, scales, torch.ones(2, device=device),
                                   torch.tensor([1, 3], dtype=torch.int32, device=device), "mxfp4")
    assert y.shape == (4, 40) and torch.all(y == 0)


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
def test_misaligned_contiguous_views(device):
    # Contiguous views that start 8 bytes into their storage: the kernels' vector loads need
    # 16-byte-aligned bases, so the launchers must copy such inputs, not fault on them.
    backend, device = device, tensor_device(device)
    k = 96
    w, scales, global_scales = make_experts(2, 24, k, "nvfp4", device)
    flat_w = torch.empty(w.numel() + 8, dtype=torch.uint8, device=device)
    shifted_w = flat_w[8:].view(w.shape)
    shifted_w.copy_(w)
    big = torch.randn(1, k + 4, device=device).bfloat16()
    x = big[:1, 4:]  # T = 1: contiguous, but 8 bytes in
    assert shifted_w.is_contiguous() and x.is_contiguous()
    offs = torch.tensor([1, 1], dtype=torch.int32, device=device)
    expected = call_op(backend, "fp4_grouped_gemm", x.clone(), w, scales, global_scales, offs, "nvfp4")
    torch.testing.assert_close(call_op(backend, "fp4_grouped_gemm", x, shifted_w, scales, global_scales, offs, "nvfp4"),
                               expected, rtol=0, atol=0)
    packed, block_scales, global_scale = call_op(backend, "quantize_fp4", torch.randn(1, 32, device=device), "nvfp4")
    raw = torch.empty(1, 32, dtype=torch.uint8, device=device)
    raw[:, 8:24] = packed
    torch.testing.assert_close(
        call_op(backend, "dequantize_fp4", raw[:, 8:24], block_scales, global_scale, "nvfp4", torch.bfloat16),
        call_op(backend, "dequantize_fp4", packed, block_scales, global_scale, "nvfp4", torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rows_that_are_not_16_byte_aligned(device, fmt, dtype):
    # A column slice of a wider buffer: rows do not start on 16-byte boundaries, so the amax and
    # quantize kernels take their element-wise (not 16-byte) load paths.
    backend, device = device, tensor_device(device)
    x = torch.randn(9, 257, device=device).to(dtype)[:, 1:]
    assert x.stride(1) == 1 and (x.stride(0) * x.element_size()) % 16 != 0
    quantize_and_compare(x, fmt, device=backend)
