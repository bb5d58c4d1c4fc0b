"""Mixture-of-experts FFN on FP4 expert weights: route -> sort tokens by expert -> grouped
gate_up GEMM -> SwiGLU -> grouped down GEMM -> weighted un-sort.

This is the FFN the Helix runtime calls for MoE layers (with its experts sharded TPF x EP);
every step is a torch op or a ``helix`` op, and nothing syncs the host with the device, so
a whole MoE layer can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from helix_ext.ops import dequantize_fp4, fp4_grouped_gemm, quantize_fp4


@dataclass
class Fp4Experts:
    """The FP4 weights of E experts for one grouped GEMM (``y = x @ W[e].T``).

    weight ``[E, N, K/2]`` uint8, block_scales ``[E, N, K/16]`` float8_e4m3fn (nvfp4) or
    ``[E, N, K/32]`` uint8 (mxfp4), global_scale ``[E]`` float32 (per-expert decode multipliers).
    """

    weight: torch.Tensor
    block_scales: torch.Tensor
    global_scale: torch.Tensor
    fmt: str

    @classmethod
    def quantize(cls, weights: torch.Tensor, fmt: str = "nvfp4") -> "Fp4Experts":
        """Quantize ``[E, N, K]`` weights expert by expert (each with its own global scale)."""
        if weights.dim() != 3:
            raise ValueError(f"weights must be [E, N, K], got shape {tuple(weights.shape)}")
        parts = [quantize_fp4(expert, fmt) for expert in weights]
        return cls(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]),
                   torch.stack([p[2] for p in parts]), fmt)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``[E, N, K]`` weights these codes stand for."""
        return torch.stack([dequantize_fp4(w, s, g, self.fmt, dtype)
                            for w, s, g in zip(self.weight, self.block_scales, self.global_scale)])

    def __call__(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return fp4_grouped_gemm(x, self.weight, self.block_scales, self.global_scale, offs, self.fmt)


def route_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool = True):
    """Softmax routing: ``(topk_ids [T, k] int64, topk_weights [T, k] float32)``."""
    probabilities = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probabilities, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int):
    """Order the (token, slot) pairs by expert: ``(order [T*k] int64, offs [E] int32)``.

    ``order[i]`` is the flat index (token * k + slot) of the i-th pair in expert order (stable,
    so each expert keeps its tokens in order); ``offs`` holds the cumulative group ends that
    ``fp4_grouped_gemm`` takes. Counting with index_add_ (not bincount) keeps the host out.
    """
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    return order, counts.cumsum(0).to(torch.int32)


def moe_ffn(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up, down,
            first_expert: int = 0) -> torch.Tensor:
    """SwiGLU experts: ``out[t] = sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t))`` with
    ``e = topk_ids[t, j]``.

    Args:
        hidden: ``[T, H]`` tokens (bfloat16 for FP4 experts).
        topk_ids: ``[T, k]`` expert ids; topk_weights: ``[T, k]`` their weights.
        gate_up: experts (``Fp4Experts``, or any callable ``(x, offs) -> y`` with a
            ``num_experts``) with ``N = 2F``, ``K = H``: rows ``[0, F)`` are the gate
            projection, rows ``[F, 2F)`` the up projection.
        down: experts with ``N = H``, ``K = F``.
        first_expert: the experts held here are ``[first_expert, first_expert + E)`` (an
            expert-parallel shard); pairs routed elsewhere contribute nothing. They are sorted
            past the last group, where the grouped GEMM writes zeros: no host sync, no
            data-dependent shapes.

    Returns:
        ``[T, H]`` in hidden's dtype (accumulated over the k experts in fp32, in slot order:
        deterministic, bit for bit, on every device).
    """
    num_tokens, top_k = topk_ids.shape
    num_local = gate_up.num_experts
    local = (topk_ids >= first_expert) & (topk_ids < first_expert + num_local)
    topk_ids = torch.where(local, topk_ids - first_expert, torch.full_like(topk_ids, num_local))
    order, offs = sort_by_expert(topk_ids, num_local + 1)
    offs = offs[:num_local]
    token_of_pair = order // top_k
    x = hidden[token_of_pair]
    gate_and_up = gate_up(x, offs)
    ffn_dim = gate_and_up.shape[1] // 2
    activated = (F.silu(gate_and_up[:, :ffn_dim].float()) * gate_and_up[:, ffn_dim:].float()).to(hidden.dtype)
    expert_out = down(activated, offs)
    # Un-sort by gathering each pair back to its (token, slot) place, then add the k slots in
    # slot order: a fixed order, unlike index_add_, whose CUDA atomics add a token's pairs in
    # whatever order they land (results would differ in the last bits from run to run).
    unsort = torch.argsort(order)
    contributions = (expert_out.float()[unsort] * topk_weights.reshape(-1, 1).float()).view(num_tokens, top_k, -1)
    out = contributions[:, 0].clone()
    for slot in range(1, top_k):
        out += contributions[:, slot]
    return out.to(hidden.dtype)


def moe_ffn_reference(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                      gate_up_weights: torch.Tensor, down_weights: torch.Tensor, *,
                      compute_dtype: torch.dtype = torch.float64, round_to: torch.dtype | None = None) -> torch.Tensor:
    """Token-by-token reference on plain ``[E, 2F, H]`` / ``[E, H, F]`` weights (e.g. the
    dequantized FP4 ones). ``round_to`` rounds the intermediates where ``moe_ffn`` stores them
    (the GEMM outputs and the activation) to that dtype; the result is in ``compute_dtype``."""
    def rounded(t):
        return t.to(round_to).to(compute_dtype) if round_to is not None else t

    out = torch.zeros(hidden.shape, dtype=compute_dtype, device=hidden.device)
    ffn_dim = gate_up_weights.shape[1] // 2
    for t in range(hidden.shape[0]):
        x = hidden[t].to(compute_dtype)
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate_and_up = rounded(gate_up_weights[e].to(compute_dtype) @ x)
            activated = rounded(F.silu(gate_and_up[:ffn_dim]) * gate_and_up[ffn_dim:])
            out[t] += topk_weights[t, j].to(compute_dtype) * rounded(down_weights[e].to(compute_dtype) @ activated)
    return out
