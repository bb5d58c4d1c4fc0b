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


class RecordingDenseExperts:
    """Plain fp32 experts ``y = x @ W[e].T`` per group that remember their last output."""

    def __init__(self, weights):
        self.weights, self.last = weights, None

    @property
    def num_experts(self):
        return self.weights.shape[0]

    def __call__(self, x, offs):
        y = torch.zeros(x.shape[0], self.weights.shape[1], dtype=x.dtype, device=x.device)
        begin = 0
        for e, end in enumerate(offs.tolist()):
            y[begin:end] = x[begin:end] @ self.weights[e].T
            begin = end
        self.last = y
        return y


@pytest.mark.parametrize("device", DEVICES)
def test_moe_un_sort_adds_the_slots_in_slot_order(device):
    # Each token's k expert outputs are added in slot order, in fp32: a fixed order, so the result
    # is the same bit for bit on every run and device (index_add_ adds them in expert order on the
    # CPU, and in the order CUDA atomics land on a GPU). With k = 4, orders differ in the last bits.
    num_tokens, hidden_size, ffn_dim, num_experts, top_k = 16, 32, 16, 6, 4
    gate_up = RecordingDenseExperts(torch.randn(num_experts, 2 * ffn_dim, hidden_size, device=device))
    down = RecordingDenseExperts(torch.randn(num_experts, hidden_size, ffn_dim, device=device))
    hidden = torch.randn(num_tokens, hidden_size, device=device)
    ids, weights = route_topk(torch.randn(num_tokens, num_experts, device=device), top_k)
    out = moe_ffn(hidden, ids, weights, gate_up, down)
    order, _ = sort_by_expert(ids, num_experts + 1)
    per_pair = torch.empty_like(down.last)
    per_pair[order] = down.last  # back to (token, slot) order
    per_pair = per_pair.view(num_tokens, top_k, hidden_size)
    expected = per_pair[:, 0] * weights[:, 0:1]
    for slot in range(1, top_k):
        expected = expected + per_pair[:, slot] * weights[:, slot:slot + 1]
    assert torch.equal(out, expected)
    # Another run gives the same bits.
    assert torch.equal(moe_ffn(hidden, ids, weights, gate_up, down), out)
