"""A dense SwiGLU FFN in one of four weight formats, whole or as one rank's TP slice.

Formats (``ModelConfig.ffn_format``):
  none          the weights as given, ``down(silu(x @ gate.T) * (x @ up.T))`` in the model dtype;
  bf16          weights and activations rounded to bf16 (fp32 accumulation), output back in
                the model dtype: the FP4 formats' baseline, same activations, exact weights;
  nvfp4, mxfp4  gate and up stacked into one ``[2F, H]`` matrix and down ``[H, F]``, each
                quantized *whole* with ``quantize_fp4`` (one NVFP4 global scale per matrix)
                and run through ``fp4_grouped_gemm`` with E = 1: bf16 activations, fp32
                accumulation, bf16 out; SwiGLU in fp32 between the two GEMMs.

A TP slice owns FFN columns ``cols``: rows ``cols`` of gate and up, columns ``cols`` of down,
so rank outputs add up (all-reduce) to the whole FFN. FP4 slices are whole quantization
blocks (16 for NVFP4, 32 for MXFP4) cut out of the whole matrix's codes and scales, so a
rank runs exactly the weights the single-rank model runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from helix_ext.moe import Fp4Experts
from helix_ext.reference import FP4_BLOCK

FFN_FORMATS = ("none", "bf16", "nvfp4", "mxfp4")


def ffn_granule(fmt: str) -> int:
    """The unit a TP slice of the FFN dim is made of: a quantization block for FP4, else 1."""
    return FP4_BLOCK.get(fmt, 1)


@dataclass
class QuantizedFfn:
    """FP4 FFN weights as grouped-GEMM weights: gate_up ``[E, 2F, H/2]`` (gate rows, then up
    rows) and down ``[E, H, F/2]``; E = 1 for a dense layer, the experts of an MoE layer."""

    gate_up: Fp4Experts
    down: Fp4Experts

    @classmethod
    def quantize(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, fmt: str) -> "QuantizedFfn":
        if fmt not in FP4_BLOCK:
            raise ValueError(f"fmt must be one of {tuple(FP4_BLOCK)}, got {fmt!r}")
        block = FP4_BLOCK[fmt]
        if gate.shape[1] % block or down.shape[1] % block:
            raise ValueError(f"{fmt} needs the hidden size ({gate.shape[1]}) and the FFN dim ({down.shape[1]}) "
                             f"to be multiples of {block}")
        stacked = torch.cat([gate, up]).float().unsqueeze(0)
        return cls(Fp4Experts.quantize(stacked, fmt), Fp4Experts.quantize(down.float().unsqueeze(0), fmt))

    def slice(self, cols: range, device: torch.device) -> "QuantizedFfn":
        """FFN columns `cols` of every expert: those rows of gate and up, those K-blocks of down."""
        fmt = self.gate_up.fmt
        block = FP4_BLOCK[fmt]
        if cols.start % block or len(cols) % block:
            raise ValueError(f"an FP4 FFN slice must be whole {fmt} blocks of {block} columns, got "
                             f"{cols.start}:{cols.stop}")
        ffn_dim = self.down.weight.shape[2] * 2
        rows = torch.tensor(list(cols) + [ffn_dim + c for c in cols], dtype=torch.long)
        gu = self.gate_up
        gate_up = Fp4Experts(gu.weight[:, rows].to(device), gu.block_scales[:, rows].to(device),
                             gu.global_scale.to(device), fmt)
        d, k0, k1 = self.down, cols.start, cols.stop
        down = Fp4Experts(d.weight[:, :, k0 // 2:k1 // 2].contiguous().to(device),
                          d.block_scales[:, :, k0 // block:k1 // block].contiguous().to(device),
                          d.global_scale.to(device), fmt)
        return QuantizedFfn(gate_up, down)


class DenseFfn:
    """``ffn(h [T, H]) -> [T, H]`` in h's dtype, for the FFN columns this instance owns."""

    def __init__(self, fmt: str, gate: torch.Tensor | None = None, up: torch.Tensor | None = None,
                 down: torch.Tensor | None = None, quantized: QuantizedFfn | None = None):
        if fmt not in FFN_FORMATS:
            raise ValueError(f"ffn format must be one of {FFN_FORMATS}, got {fmt!r}")
        self.fmt, self.quantized = fmt, quantized
        self.gate_up = self.down = None
        if quantized is None:
            if fmt == "bf16":
                gate, up, down = (t.to(torch.bfloat16) for t in (gate, up, down))
            # gate and up stacked: one GEMM (the same bits as two), whose halves SwiGLU combines.
            self.gate_up, self.down = torch.cat([gate, up]), down

    @classmethod
    def from_full(cls, fmt: str, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, cols: range | None,
                  device: torch.device, quantized: QuantizedFfn | None = None) -> "DenseFfn":
        """The slice ``cols`` (None: all) of a layer given whole: gate, up [F, H], down [H, F].
        FP4 formats quantize the whole layer (or take its codes from ``quantized``), then cut."""
        cols = cols if cols is not None else range(gate.shape[0])
        if fmt in FP4_BLOCK:
            quantized = quantized or QuantizedFfn.quantize(gate, up, down, fmt)
            return cls(fmt, quantized=quantized.slice(cols, device))
        return cls(fmt, gate[cols.start:cols.stop].to(device), up[cols.start:cols.stop].to(device),
                   down[:, cols.start:cols.stop].contiguous().to(device))

    @property
    def columns(self) -> int:
        if self.quantized is not None:
            return self.quantized.down.weight.shape[2] * 2
        return self.gate_up.shape[0] // 2

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.columns == 0:  # more ranks than FFN blocks: this rank holds none
            return torch.zeros_like(h)
        if self.quantized is None:
            x = h.to(torch.bfloat16) if self.fmt == "bf16" else h
            gate_up = F.linear(x, self.gate_up)
            f = gate_up.shape[1] // 2
            return F.linear(F.silu(gate_up[:, :f]) * gate_up[:, f:], self.down).to(h.dtype)
        x = h.to(torch.bfloat16)
        offs = torch.full((1,), x.shape[0], dtype=torch.int32, device=x.device)
        gate_up = self.quantized.gate_up(x, offs).float()
        f = gate_up.shape[1] // 2
        act = (F.silu(gate_up[:, :f]) * gate_up[:, f:]).to(torch.bfloat16)
        return self.quantized.down(act, offs).to(h.dtype)
