"""Bytes and flops of every benchmarked shape, and its label, computed without touching a
tensor: the roofline runner (bench/cases.py) and the static kernel report
(bench/kernels_report.py) share them. Bytes count what must move at least once: inputs
read, outputs written."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float8_e4m3fn: "fp8"}


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Traffic:
    shape: str        # the label of the shape in benchmark results
    bytes_moved: int
    flops: int


def merge_states_traffic(num_parts: int, batch: int, heads: int, head_dim: int, dtype: torch.dtype) -> Traffic:
    rows, element = batch * heads, element_size(dtype)
    bytes_moved = num_parts * rows * (head_dim * element + 4) + rows * (head_dim * element + 4)
    return Traffic(f"P={num_parts},B={batch},H={heads},D={head_dim},{DTYPE_NAMES[dtype]}", bytes_moved,
                   2 * num_parts * rows * head_dim)


def flash_decode_traffic(label: str, batch: int, num_q_heads: int, num_kv_heads: int, head_dim_k: int,
                         head_dim_v: int, seq_len: int, block_size: int | None, kv_dtype: torch.dtype,
                         num_queries: int = 1) -> Traffic:
    """num_queries: query tokens per sequence (speculative decoding), each over the whole cache
    (the roofline's upper bound: their causal tail masks at most Q - 1 keys)."""
    mla = head_dim_k != head_dim_v
    kv_bytes = batch * seq_len * num_kv_heads * (head_dim_k + (0 if mla else head_dim_v)) * element_size(kv_dtype)
    rows = batch * num_queries * num_q_heads
    bytes_moved = kv_bytes + rows * (head_dim_k * 2 + head_dim_v * 2 + 4)
    layout = "contiguous" if block_size is None else f"paged{block_size}"
    shape = (f"{label}:B={batch},{f'Q={num_queries},' if num_queries > 1 else ''}Hq={num_q_heads},"
             f"Hkv={num_kv_heads},D={head_dim_k}"
             f"{'/' + str(head_dim_v) if mla else ''},L={seq_len},{DTYPE_NAMES[kv_dtype]},{layout}")
    return Traffic(shape, bytes_moved, 2 * rows * seq_len * (head_dim_k + head_dim_v))


def fp4_grouped_gemm_traffic(label: str, num_experts: int, n: int, k: int, tokens_per_expert: int,
                             fmt: str) -> Traffic:
    tokens, block = num_experts * tokens_per_expert, 16 if fmt == "nvfp4" else 32
    bytes_moved = (num_experts * n * k // 2 + num_experts * n * k // block + num_experts * 8  # weights, scales
                   + tokens * k * 2 + tokens * n * 2)  # activations in, output out
    return Traffic(f"{label}:E={num_experts},N={n},K={k},T={tokens},{fmt}", bytes_moved, 2 * tokens * n * k)


def quantize_fp4_traffic(label: str, rows: int, cols: int, fmt: str, given_global: bool) -> Traffic:
    block = 16 if fmt == "nvfp4" else 32
    elements = rows * cols
    variant = "given global" if given_global else ("amax" if fmt == "nvfp4" else "")
    return Traffic(f"{label}:M={rows},K={cols},bf16,{fmt}{',' + variant if variant else ''}",
                   elements * 2 + elements // 2 + elements // block + 4, 0)


def hopb_combine_traffic(num_peers: int, batch: int, heads: int, head_dim: int, dtype: torch.dtype) -> Traffic:
    rows, element = batch * heads, element_size(dtype)
    bytes_moved = num_peers * rows * (head_dim * element + 4) + rows * (head_dim * element + 4)
    return Traffic(f"P={num_peers},B={batch},H={heads},D={head_dim},{DTYPE_NAMES[dtype]}", bytes_moved,
                   2 * num_peers * rows * head_dim)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b) if b else 0


__all__ = ["DTYPE_NAMES", "Traffic", "ceil_div", "element_size", "flash_decode_traffic", "fp4_grouped_gemm_traffic",
           "hopb_combine_traffic", "math", "merge_states_traffic", "quantize_fp4_traffic"]
