"""The benchmarked shapes of every op, their byte counts and their peers.

Each case builds fresh random inputs (never zeros), a call of the helix op, a call of the
best peer available on the same machine, and the bytes that must move at least once
(inputs read, outputs written).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import math

import torch

import helix_ext
from helix_ext.reference import merge_states_reference

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float8_e4m3fn: "fp8"}


@dataclass
class Case:
    op: str
    shape: str
    bytes_moved: int
    run: Callable[[], object]
    # (name, call) of every peer that can run this shape; the runner reports the fastest.
    peers: list[tuple[str, Callable[[], object]]]


def merge_states_case(num_parts: int, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                      device: str) -> Case:
    parts_out = torch.randn(num_parts, batch, heads, head_dim, dtype=dtype, device=device)
    parts_lse = torch.randn(num_parts, batch, heads, device=device) * 4
    element = parts_out.element_size()
    rows = batch * heads
    bytes_moved = (num_parts * rows * head_dim * element + num_parts * rows * 4  # read parts
                   + rows * head_dim * element + rows * 4)  # write the merged state
    return Case(
        op="merge_states",
        shape=f"P={num_parts},B={batch},H={heads},D={head_dim},{_DTYPE_NAMES[dtype]}",
        bytes_moved=bytes_moved,
        run=lambda: helix_ext.merge_states(parts_out, parts_lse),
        peers=[("eager torch (same math, fp32)",
                lambda: merge_states_reference(parts_out, parts_lse, compute_dtype=torch.float32))],
    )


def _sdpa_flash_peer(q, keys, values, scale):
    """torch's own flash attention with its LSE. GQA decode as attention of G query rows per KV
    head: q [B, Hkv, G, D] against K/V [B, Hkv, L, D], so K/V are read once, as by helix."""
    if q.is_cuda:
        return lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, keys, values, scale=scale)[:2]
    return lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, keys, values, scale=scale)


def _flex_peer(q, keys, values, scale):
    """torch.compile(flex_attention) with the LSE returned (GPU only)."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, keys, values, scale=scale, return_lse=True)


def flash_decode_case(batch: int, num_q_heads: int, num_kv_heads: int, head_dim_k: int, head_dim_v: int,
                      seq_len: int, block_size: int | None, kv_dtype: torch.dtype, device: str, label: str,
                      peers: tuple[str, ...] = ("sdpa_flash", "flex")) -> Case:
    """Decode attention over seq_len tokens per sequence. block_size None lays each sequence's
    cache out contiguously (one block per sequence); otherwise blocks of block_size, dealt to
    the sequences in a shuffled order. MLA when head_dim_k != head_dim_v (V inside the K entry).
    Peers read bf16 K/V laid out contiguously as they want it."""
    mla = head_dim_k != head_dim_v
    q_dtype = torch.bfloat16
    block = seq_len if block_size is None else block_size
    blocks_per_seq = math.ceil(seq_len / block)
    num_blocks = batch * blocks_per_seq
    order = torch.arange(num_blocks) if block_size is None else torch.randperm(num_blocks)
    block_table = order.view(batch, blocks_per_seq).to(torch.int32).to(device)
    fp8 = kv_dtype == torch.float8_e4m3fn
    q = torch.randn(batch, num_q_heads, head_dim_k, dtype=q_dtype, device=device)
    k_cache = torch.randn(num_blocks, block, num_kv_heads, head_dim_k, device=device, dtype=q_dtype).to(kv_dtype)
    v_cache = None if mla else torch.randn(num_blocks, block, num_kv_heads, head_dim_v, device=device,
                                           dtype=q_dtype).to(kv_dtype)
    seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device=device)
    scale = head_dim_k ** -0.5
    k_scale = torch.tensor(1.0, device=device) if fp8 else None
    v_scale = torch.tensor(1.0, device=device) if fp8 and not mla else None
    head_dim_v_arg = head_dim_v if mla else -1

    kv_element = torch.empty((), dtype=kv_dtype).element_size()
    kv_bytes = batch * seq_len * num_kv_heads * (head_dim_k + (0 if mla else head_dim_v)) * kv_element
    bytes_moved = (kv_bytes + q.numel() * 2 + batch * num_q_heads * head_dim_v * 2 + batch * num_q_heads * 4)
    layout = "contiguous" if block_size is None else f"paged{block_size}"
    shape = (f"{label}:B={batch},Hq={num_q_heads},Hkv={num_kv_heads},D={head_dim_k}"
             f"{'/' + str(head_dim_v) if mla else ''},L={seq_len},{_DTYPE_NAMES[kv_dtype]},{layout}")

    # Peers: bf16 K/V as [B, Hkv, L, D] contiguous, queries grouped per KV head.
    group = num_q_heads // num_kv_heads
    peer_q = q.view(batch, num_kv_heads, group, head_dim_k)
    peer_keys = torch.randn(batch, num_kv_heads, seq_len, head_dim_k, dtype=q_dtype, device=device)
    peer_values = peer_keys[..., :head_dim_v] if mla else torch.randn(batch, num_kv_heads, seq_len, head_dim_v,
                                                                      dtype=q_dtype, device=device)
    candidates = []
    if "sdpa_flash" in peers and not mla and head_dim_k <= 256:
        candidates.append(("torch flash SDPA (bf16 KV)", _sdpa_flash_peer(peer_q, peer_keys, peer_values, scale)))
    if "flex" in peers and device == "cuda":
        candidates.append(("torch.compile(flex_attention) (bf16 KV)",
                           _flex_peer(peer_q, peer_keys, peer_values.contiguous(), scale)))
    return Case(
        op="flash_decode",
        shape=shape,
        bytes_moved=bytes_moved,
        run=lambda: helix_ext.flash_decode(q, k_cache, v_cache, block_table, seq_lens, scale, head_dim_v_arg,
                                           k_scale, v_scale),
        peers=candidates,
    )


# The standard shape of each op (the one the cupy cross-check times) comes first.
STANDARD = {
    "merge_states": dict(num_parts=8, batch=64, heads=128, head_dim=512, dtype=torch.bfloat16),
    "flash_decode": dict(label="G1", batch=8, num_q_heads=16, num_kv_heads=1, head_dim_k=128, head_dim_v=128,
                         seq_len=131072, block_size=64, kv_dtype=torch.bfloat16),
}
_FLASH_DECODE_HEADLINES = [
    dict(label="G2", batch=32, num_q_heads=64, num_kv_heads=8, head_dim_k=128, head_dim_v=128, seq_len=16384,
         block_size=64, kv_dtype=torch.bfloat16),
    dict(label="G3", batch=1, num_q_heads=8, num_kv_heads=1, head_dim_k=128, head_dim_v=128, seq_len=4096,
         block_size=64, kv_dtype=torch.bfloat16),
    dict(label="M1", batch=16, num_q_heads=128, num_kv_heads=1, head_dim_k=576, head_dim_v=512, seq_len=16384,
         block_size=64, kv_dtype=torch.bfloat16),
    dict(label="M2", batch=64, num_q_heads=128, num_kv_heads=1, head_dim_k=576, head_dim_v=512, seq_len=4096,
         block_size=64, kv_dtype=torch.bfloat16),
    dict(label="G1", batch=8, num_q_heads=16, num_kv_heads=1, head_dim_k=128, head_dim_v=128, seq_len=131072,
         block_size=64, kv_dtype=torch.float8_e4m3fn),
    dict(label="M1", batch=16, num_q_heads=128, num_kv_heads=1, head_dim_k=576, head_dim_v=512, seq_len=16384,
         block_size=64, kv_dtype=torch.float8_e4m3fn),
]
# Quick mode runs these besides the standard shapes: they carry the targets.
QUICK_EXTRA = {"merge_states": [], "flash_decode": _FLASH_DECODE_HEADLINES}
EXTRA = {
    "merge_states": [
        dict(num_parts=2, batch=64, heads=128, head_dim=512, dtype=torch.bfloat16),
        dict(num_parts=4, batch=32, heads=32, head_dim=128, dtype=torch.bfloat16),
        dict(num_parts=16, batch=8, heads=64, head_dim=512, dtype=torch.float16),
        dict(num_parts=8, batch=64, heads=32, head_dim=128, dtype=torch.float32),
    ],
    "flash_decode": _FLASH_DECODE_HEADLINES + [
        # The same shapes with the cache laid out contiguously (one block per sequence).
        dict(label="G1", batch=8, num_q_heads=16, num_kv_heads=1, head_dim_k=128, head_dim_v=128, seq_len=131072,
             block_size=None, kv_dtype=torch.bfloat16),
        dict(label="M1", batch=16, num_q_heads=128, num_kv_heads=1, head_dim_k=576, head_dim_v=512, seq_len=16384,
             block_size=None, kv_dtype=torch.bfloat16),
    ],
}
# Tiny shapes for checking the harness itself (tests, --smoke), not for numbers.
SMOKE = {
    "merge_states": [dict(num_parts=3, batch=2, heads=4, head_dim=64, dtype=torch.bfloat16)],
    "flash_decode": [
        dict(label="smoke", batch=2, num_q_heads=8, num_kv_heads=2, head_dim_k=64, head_dim_v=64, seq_len=256,
             block_size=16, kv_dtype=torch.bfloat16),
        dict(label="smoke", batch=2, num_q_heads=16, num_kv_heads=1, head_dim_k=576, head_dim_v=512, seq_len=128,
             block_size=64, kv_dtype=torch.float8_e4m3fn),
    ],
}
BUILDERS = {"merge_states": merge_states_case, "flash_decode": flash_decode_case}


def cases(device: str, mode: str) -> Iterator[Case]:
    """mode: 'smoke', 'quick' (standard + headline shapes) or 'full' (all shapes). Cases are
    built one at a time, so only one case's tensors are alive at once; each op's standard
    shape comes first."""
    for op, builder in BUILDERS.items():
        if mode == "smoke":
            shapes = SMOKE[op]
        elif mode == "quick":
            shapes = [STANDARD[op]] + QUICK_EXTRA[op]
        else:
            shapes = [STANDARD[op]] + EXTRA[op]
        for shape in shapes:
            yield builder(device=device, **shape)
