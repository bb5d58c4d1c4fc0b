"""helix.merge_states against its float64 reference, on CPU, CUDA (where present) and the emulated CUDA
kernel (the SIMT host runtime, device "simt")."""

from __future__ import annotations

import pytest
import torch

import helix_ext
from helix_ext.reference import merge_states_reference
from conftest import DEVICES, DEVICES_AND_SIMT, call_op, tensor_device
from tolerance import assert_close_to_reference

NEG_INF = float("-inf")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def make_parts(num_parts: int, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: str, *,
               lse_scale: float = 4.0, lse_offset: float = 0.0, absent_fraction: float = 0.25,
               all_absent_row: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh random partial states. A fraction of the parts is absent (-inf LSE) and holds
    NaN garbage; with all_absent_row, row (0, 0) has every part absent."""
    parts_out = torch.randn(num_parts, batch, heads, head_dim).to(dtype)
    parts_lse = torch.randn(num_parts, batch, heads) * lse_scale + lse_offset
    absent = torch.rand(num_parts, batch, heads) < absent_fraction
    if all_absent_row and batch > 0 and heads > 0:
        absent[:, 0, 0] = True
    parts_lse[absent] = NEG_INF
    parts_out[absent] = float("nan")
    return parts_out.to(tensor_device(device)), parts_lse.to(tensor_device(device))


def check_against_reference(parts_out: torch.Tensor, parts_lse: torch.Tensor,
                            device: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = call_op(device or parts_out.device.type, "merge_states", parts_out, parts_lse)
    assert out.dtype == parts_out.dtype and lse.dtype == torch.float32
    assert out.device == parts_out.device and lse.device == parts_out.device
    assert out.is_contiguous() and lse.is_contiguous()
    ref_out, ref_lse = merge_states_reference(parts_out.cpu(), parts_lse.cpu(), out_dtype=torch.float64)
    base_out, base_lse = merge_states_reference(parts_out.cpu(), parts_lse.cpu(), compute_dtype=torch.float32)
    terms = parts_out.shape[0]
    assert_close_to_reference(out, ref_out, base_out, accumulated_terms=terms, name="out")
    assert_close_to_reference(lse, ref_lse, base_lse, accumulated_terms=terms, name="lse")
    return out, lse


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_parts", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("head_dim", [7, 128])
def test_matches_reference(device, dtype, num_parts, head_dim):
    parts_out, parts_lse = make_parts(num_parts, 3, 5, head_dim, dtype, device)
    out, lse = check_against_reference(parts_out, parts_lse, device)
    # Row (0, 0) has every part absent: exactly 0 and -inf.
    assert torch.all(out[0, 0] == 0) and lse[0, 0].item() == NEG_INF


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("head_dim", [1, 8, 64, 512, 769, 1024])
def test_head_dims(device, head_dim):
    parts_out, parts_lse = make_parts(4, 2, 3, head_dim, torch.bfloat16, device)
    check_against_reference(parts_out, parts_lse, device)


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
def test_many_parts_and_rows(device):
    # P = 256 (the contract's largest), many (b, h) rows, a grid of several waves on a GPU.
    parts_out, parts_lse = make_parts(256, 4, 40, 64, torch.float16, device, absent_fraction=0.5)
    check_against_reference(parts_out, parts_lse, device)


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("offset", [1000.0, -1000.0])
def test_huge_lse_magnitudes(device, dtype, offset):
    parts_out, parts_lse = make_parts(8, 4, 6, 32, dtype, device, lse_scale=30.0, lse_offset=offset)
    out, lse = check_against_reference(parts_out, parts_lse, device)
    present = lse != NEG_INF
    assert torch.isfinite(out).all() and torch.isfinite(lse[present]).all()


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("base", [1.0, 100.0, 800.0, 5000.0, 2.0e4, -800.0, -2.0e4])
def test_accuracy_does_not_depend_on_lse_magnitude(device, base):
    # Weights relative to the largest LSE: the fp32 result is within a few ulps of the exact
    # merge at |LSE| = 1 and at |LSE| = 2e4 alike (weights relative to a rounded fp32 merged LSE
    # would err by |LSE| * 2^-24: 1.2e-3 at 2e4).
    num_parts = 8
    parts_out, parts_lse = make_parts(num_parts, 4, 6, 32, torch.float32, device, lse_scale=3.0, lse_offset=base,
                                      absent_fraction=0.2)
    out, lse = call_op(device, "merge_states", parts_out, parts_lse)
    ref_out, ref_lse = merge_states_reference(parts_out.cpu(), parts_lse.cpu(), out_dtype=torch.float64)
    present = ref_lse != NEG_INF
    eps = torch.finfo(torch.float32).eps
    # Per row: rounding of P products and sums of values up to max|O|, plus the normalizer.
    row_scale = parts_out.cpu().nan_to_num().abs().amax(dim=(0, 3)).double()
    out_error = (out.cpu().double() - ref_out).abs().amax(dim=-1)
    assert torch.all(out_error[present] <= 2 * (num_parts + 2) * eps * row_scale[present]), out_error.max()
    # The merged LSE: max + log(sum), within two ulps of its own magnitude plus a few eps.
    lse_error = (lse.cpu().double() - ref_lse).abs()
    assert torch.all(lse_error[present] <= 2 * eps * ref_lse[present].abs() + 4 * eps), lse_error[present].max()
    assert torch.all(out[~present.to(out.device)] == 0) and torch.all(lse[~present.to(lse.device)] == NEG_INF)


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "plus_inf"])
def test_nan_or_plus_inf_lse_gives_nan_rows(device, dtype, bad):
    # -inf means absent and nothing else: a NaN or +inf LSE among a row's parts makes that row
    # NaN (out and lse), wherever it sits among the parts; every other row is unchanged.
    parts_out, parts_lse = make_parts(5, 3, 4, 24, dtype, device, absent_fraction=0.3)
    parts_lse[0, 1, 1] = bad  # first part
    parts_lse[4, 2, 3] = bad  # last part
    parts_lse[:, 2, 0] = NEG_INF
    parts_lse[2, 2, 0] = bad  # the only non-absent part of its row
    out, lse = check_against_reference(parts_out, parts_lse, device)
    for b, h in [(1, 1), (2, 3), (2, 0)]:
        assert torch.isnan(out[b, h]).all() and torch.isnan(lse[b, h]), (b, h)
    poisoned = torch.zeros(3, 4, dtype=torch.bool)
    poisoned[1, 1] = poisoned[2, 3] = poisoned[2, 0] = True
    assert not torch.isnan(lse.cpu()[~poisoned]).any()
    clean_lse = parts_lse.clone()
    clean_lse[:, poisoned] = 0.0
    clean_out, clean_result_lse = call_op(device, "merge_states", parts_out, clean_lse)
    assert torch.equal(out[~poisoned.to(out.device)], clean_out[~poisoned.to(out.device)])
    assert torch.equal(lse[~poisoned.to(lse.device)], clean_result_lse[~poisoned.to(lse.device)])


@pytest.mark.parametrize("device", DEVICES)
def test_all_parts_absent(device):
    parts_out = torch.full((5, 2, 3, 16), float("nan"), device=device)
    parts_lse = torch.full((5, 2, 3), NEG_INF, device=device)
    out, lse = helix_ext.merge_states(parts_out, parts_lse)
    assert torch.all(out == 0) and torch.all(lse == NEG_INF)


@pytest.mark.parametrize("device", DEVICES)
def test_single_present_part_is_copied(device):
    # One present part among absent ones: its output comes back (to rounding) with its own LSE.
    parts_out, parts_lse = make_parts(4, 2, 3, 24, torch.float32, device, absent_fraction=0.0,
                                      all_absent_row=False)
    parts_lse[1:] = NEG_INF
    out, lse = helix_ext.merge_states(parts_out, parts_lse)
    torch.testing.assert_close(out, parts_out[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, parts_lse[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_associativity(device, dtype):
    # merge(merge(A), merge(B)) == merge(A u B): Helix may merge in stages (splits, then ranks).
    parts_out, parts_lse = make_parts(12, 3, 4, 40, dtype, device)
    whole_out, whole_lse = helix_ext.merge_states(parts_out, parts_lse)
    first = helix_ext.merge_states(parts_out[:5], parts_lse[:5])
    second = helix_ext.merge_states(parts_out[5:], parts_lse[5:])
    staged_out, staged_lse = helix_ext.merge_states(torch.stack([first[0], second[0]]),
                                                    torch.stack([first[1], second[1]]))
    ref_out, ref_lse = merge_states_reference(parts_out.cpu(), parts_lse.cpu(), out_dtype=torch.float64)
    # Staging rounds the intermediate to the dtype once more: allow twice the one-shot error.
    assert_close_to_reference(staged_out, ref_out, whole_out, ulps=4.0, accumulated_terms=12, name="staged out")
    assert_close_to_reference(staged_lse, ref_lse, whole_lse, ulps=4.0, accumulated_terms=12, name="staged lse")


@pytest.mark.parametrize("device", DEVICES_AND_SIMT)
@pytest.mark.parametrize("layout", ["sliced_head_dim", "permuted", "strided_head_dim", "expanded_lse"])
def test_strided_inputs(device, layout):
    backend, device = device, tensor_device(device)
    num_parts, batch, heads, head_dim = 4, 3, 5, 64
    if layout == "sliced_head_dim":  # a view into a wider buffer: D contiguous, rows strided
        parts_out = torch.randn(num_parts, batch, heads, head_dim + 16, device=device)[..., :head_dim]
        parts_lse = torch.randn(num_parts, batch, heads + 3, device=device)[:, :, :heads]
    elif layout == "permuted":  # received as [B, P, H, D] / [B, H, P]
        parts_out = torch.randn(batch, num_parts, heads, head_dim, device=device).permute(1, 0, 2, 3)
        parts_lse = torch.randn(batch, heads, num_parts, device=device).permute(2, 0, 1)
    elif layout == "strided_head_dim":  # D not contiguous: the scalar path
        parts_out = torch.randn(num_parts, batch, heads, 2 * head_dim, device=device)[..., ::2]
        parts_lse = torch.randn(num_parts, batch, heads, device=device)
    else:  # one LSE per part broadcast over (b, h): zero strides
        parts_out = torch.randn(num_parts, batch, heads, head_dim, device=device)
        parts_lse = torch.randn(num_parts, 1, 1, device=device).expand(num_parts, batch, heads)
    parts_lse = parts_lse * 3
    check_against_reference(parts_out.to(torch.bfloat16), parts_lse, backend)
    check_against_reference(parts_out, parts_lse, backend)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_shapes(device):
    out, lse = helix_ext.merge_states(torch.randn(3, 0, 4, 8, device=device), torch.randn(3, 0, 4, device=device))
    assert out.shape == (0, 4, 8) and lse.shape == (0, 4)
    # No parts at all: a merge of nothing is all absent.
    out, lse = helix_ext.merge_states(torch.randn(0, 2, 3, 8, device=device), torch.randn(0, 2, 3, device=device))
    assert torch.all(out == 0) and torch.all(lse == NEG_INF)


def bad_inputs(device):
    out = torch.randn(2, 3, 4, 8, device=device)
    lse = torch.randn(2, 3, 4, device=device)
    return [
        ("3-D parts_out", (out[0], lse), r"parts_out must be 4-D"),
        ("2-D parts_lse", (out, lse[0]), r"parts_lse must be 3-D"),
        ("integer parts_out", (out.to(torch.int32), lse), r"parts_out must be float32, bfloat16 or float16"),
        ("float64 parts_out", (out.double(), lse), r"parts_out must be float32, bfloat16 or float16"),
        ("bf16 parts_lse", (out, lse.bfloat16()), r"parts_lse must be float32"),
        ("P mismatch", (out, lse[:1]), r"parts_lse has 1 parts .* parts_out has 2"),
        ("B mismatch", (out, lse[:, :2]), r"parts_lse must be \[P, B, H\]"),
        ("H mismatch", (out, lse[:, :, :3]), r"parts_lse must be \[P, B, H\]"),
        ("D = 0", (out[..., :0], lse), r"head dim D >= 1"),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    for label, args, message in bad_inputs(device):
        with pytest.raises(RuntimeError, match=message):
            helix_ext.merge_states(*args)
        # The fake kernel rejects the same inputs (torch.compile sees the same errors).
        with pytest.raises(RuntimeError, match=message), torch._subclasses.FakeTensorMode() as mode:
            fake_args = [mode.from_tensor(a) for a in args]
            torch.ops.helix.merge_states.default(*fake_args)


@pytest.mark.gpu
def test_device_mismatch():
    with pytest.raises(RuntimeError, match=r"same device"):
        helix_ext.merge_states(torch.randn(2, 3, 4, 8, device="cuda"), torch.randn(2, 3, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_opcheck(device, dtype):
    parts_out, parts_lse = make_parts(3, 2, 4, 16, dtype, device)
    parts_out = torch.nan_to_num(parts_out)  # opcheck compares outputs of several paths
    torch.library.opcheck(torch.ops.helix.merge_states.default, (parts_out, parts_lse))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device):
    torch._dynamo.reset()

    def step(parts_out, parts_lse):
        out, lse = helix_ext.merge_states(parts_out, parts_lse)
        return out * 2, lse + 1

    compiled = torch.compile(step, fullgraph=True)
    parts_out, parts_lse = make_parts(4, 3, 5, 32, torch.bfloat16, device)
    expected = step(parts_out, parts_lse)
    actual = compiled(parts_out, parts_lse)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_matches_cpu_and_writes_every_element():
    # Poison the caching allocator so an unwritten output element would show up as NaN.
    torch.full((64 << 20,), float("nan"), device="cuda")
    parts_out, parts_lse = make_parts(8, 16, 32, 136, torch.bfloat16, "cpu", absent_fraction=0.1)
    cpu_out, cpu_lse = helix_ext.merge_states(parts_out, parts_lse)
    cuda_out, cuda_lse = helix_ext.merge_states(parts_out.cuda(), parts_lse.cuda())
    assert not torch.isnan(cuda_out).any() and not torch.isnan(cuda_lse).any()
    # Same shared math; only expf/fma rounding may differ: within one bf16 ulp.
    torch.testing.assert_close(cuda_out.cpu(), cpu_out, rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(cuda_lse.cpu(), cpu_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_more_than_2_pow_31_elements():
    # parts_out has 2**31 elements (4 GiB of bf16): every index must be 64-bit.
    num_parts, batch, heads, head_dim = 2, 16384, 128, 512
    parts_out = torch.empty(num_parts, batch, heads, head_dim, dtype=torch.bfloat16, device="cuda").normal_()
    parts_lse = torch.randn(num_parts, batch, heads, device="cuda") * 3
    out, lse = helix_ext.merge_states(parts_out, parts_lse)
    rows = torch.tensor([0, 1, batch // 2, batch - 2, batch - 1], device="cuda")
    ref_out, ref_lse = merge_states_reference(parts_out[:, rows].cpu(), parts_lse[:, rows].cpu(), out_dtype=torch.float64)
    base_out, base_lse = merge_states_reference(parts_out[:, rows].cpu(), parts_lse[:, rows].cpu(),
                                                compute_dtype=torch.float32)
    assert_close_to_reference(out[rows], ref_out, base_out, name="out (last rows)")
    assert_close_to_reference(lse[rows], ref_lse, base_lse, name="lse (last rows)")
