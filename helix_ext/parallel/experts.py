"""MoE experts for the runtime: routing, and a rank's shard of the experts (EP slice of the
experts, TPF slice of each expert's FFN dim), plain or FP4.

FP4 experts are quantized whole (gate_up [2F, H] and down [H, F] per expert, each with its own
NVFP4 global scale) on every rank, then sliced: rows of gate_up and K-blocks of down, so a
rank's codes are exactly the matching part of the full expert's and the single-rank reference
runs the same dequantized weights.
"""

from __future__ import annotations

import torch

from helix_ext.moe import Fp4Experts, route_topk
from helix_ext.parallel.ffn import FP4_BLOCK, QuantizedFfn


def route(x: torch.Tensor, router: torch.Tensor, top_k: int):
    """Softmax top-k routing with renormalized weights: (ids [T, k], weights [T, k] fp32)."""
    return route_topk(x.float() @ router.float().T, top_k)


class DenseExperts:
    """Plain expert weights [E, N, K] with the grouped-GEMM call of Fp4Experts: x [T, K],
    offs [E] cumulative ends -> y [T, N], rows past offs[-1] zero. torch._grouped_mm on CUDA
    (bf16); elsewhere a loop over the groups (it reads offs on the host: a test/reference path)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == torch.bfloat16:
            y = torch._grouped_mm(x, self.weight.transpose(-2, -1), offs=offs)
            rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
            return torch.where(rows < offs[-1], y, torch.zeros_like(y))
        y = torch.zeros(x.shape[0], self.weight.shape[1], dtype=x.dtype, device=x.device)
        begin = 0
        for e, end in enumerate(offs.tolist()):
            if end > begin:
                y[begin:end] = x[begin:end] @ self.weight[e].T
            begin = end
        return y


def reference_expert_weights(config, w: dict, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' effective weights (gate_up [E, 2F, H], down [E, H, F]) in the model dtype:
    the plain ones, or the FP4 codes dequantized."""
    gate_up, down = w[prefix + "experts.gate_up"], w[prefix + "experts.down"]
    if config.expert_format not in FP4_BLOCK:
        return gate_up, down
    return tuple(Fp4Experts.quantize(weights.float(), config.expert_format).dequantize().to(config.dtype)
                 for weights in (gate_up, down))


def local_experts(config, w: dict, prefix: str, experts: range, ffn_slice: range, device: torch.device):
    """This rank's (gate_up, down) experts: experts `experts`, FFN dims `ffn_slice` of each."""
    f = config.moe_ffn_dim
    gate_up = w[prefix + "experts.gate_up"][experts.start:experts.stop]
    down = w[prefix + "experts.down"][experts.start:experts.stop]
    if config.expert_format not in FP4_BLOCK:
        rows = list(ffn_slice) + [f + i for i in ffn_slice]  # gate rows, then the matching up rows
        return (DenseExperts(gate_up[:, rows].to(device)),
                DenseExperts(down[:, :, ffn_slice.start:ffn_slice.stop].contiguous().to(device)))
    fmt = config.expert_format
    whole = QuantizedFfn(Fp4Experts.quantize(gate_up.float(), fmt), Fp4Experts.quantize(down.float(), fmt))
    local = whole.slice(ffn_slice, device)
    return local.gate_up, local.down
