"""helix_ext.moe: the FP4 MoE FFN (route, sort, grouped GEMMs, SwiGLU, un-sort) against a
token-by-token float64 reference on the same (dequantized) expert weights."""

import pytest
import torch

from helix_ext.moe import Fp4Experts, moe_ffn, moe_ffn_reference, route_topk, sort_by_expert
from conftest import DEVICES
from tolerance import assert_close_to_reference


def test_sort_by_expert_orders_pairs_and_counts_groups():
    ids = torch.tensor([[2, 0], [1, 2], [2, 3]])
    order, offs = sort_by_expert(ids, num_experts=5)
    assert ids.flatten()[order].tolist() == [0, 1, 2, 2, 2, 3]
    assert order.tolist() == [1, 2, 0, 3, 4, 5]  # stable: expert 2's pairs keep token order
    assert offs.tolist() == [1, 2, 5, 6, 6] and offs.dtype == torch.int32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_moe_ffn_matches_reference(device, fmt):
    num_tokens, hidden_size, ffn_dim, num_experts, top_k = 9, 128, 64, 6, 2
    gate_up = Fp4Experts.quantize(torch.randn(num_experts, 2 * ffn_dim, hidden_size).to(device) / 8, fmt)
    down = Fp4Experts.quantize(torch.randn(num_experts, hidden_size, ffn_dim).to(device) / 8, fmt)
    hidden = torch.randn(num_tokens, hidden_size, device=device).bfloat16()
    ids, weights = route_topk(torch.randn(num_tokens, num_experts, device=device), top_k)
    ids[0] = torch.tensor([5, 5 - 1])  # experts 0..3 may be empty, 4 and 5 are not
    out = moe_ffn(hidden, ids, weights, gate_up, down)
    assert out.shape == hidden.shape and out.dtype == torch.bfloat16
    dense_gate_up, dense_down = gate_up.dequantize().cpu(), down.dequantize().cpu()
    args = (hidden.cpu(), ids.cpu(), weights.cpu(), dense_gate_up, dense_down)
    reference = moe_ffn_reference(*args)
    baseline = moe_ffn_reference(*args, compute_dtype=torch.float32, round_to=torch.bfloat16)
    assert_close_to_reference(out, reference, baseline, factor=3.0, accumulated_terms=hidden_size, name="moe out")
