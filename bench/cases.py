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
from bench.traffic import (DTYPE_NAMES, fp4_grouped_gemm_traffic, flash_decode_traffic, hopb_combine_traffic,
                           merge_states_traffic, quantize_fp4_traffic)
from helix_ext.reference import merge_states_reference, quantize_fp4_reference


@dataclass
class Case:
    op: str
    shape: str
    bytes_moved: int
    run: Callable[[], object]
    # (name, call) of every peer that can run this shape; the runner reports the fastest.
    peers: list[tuple[str, Callable[[], object]]]
    # hopb_overlap: the chunk count and the attention / exchange of one chunk, timed alone.
    overlap_parts: tuple[int, Callable[[], object], Callable[[], object]] | None = None


def merge_states_case(num_parts: int, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                      device: str) -> Case:
    parts_out = torch.randn(num_parts, batch, heads, head_dim, dtype=dtype, device=device)
    parts_lse = torch.randn(num_parts, batch, heads, device=device) * 4
    traffic = merge_states_traffic(num_parts, batch, heads, head_dim, dtype)
    return Case(
        op="merge_states",
        shape=traffic.shape,
        bytes_moved=traffic.bytes_moved,
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


def _eager_peer(q, keys, values, scale):
    """Plain torch: scores, their logsumexp, softmax, P @ V (any head dims, MLA included)."""
    def run():
        scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scale
        lse = torch.logsumexp(scores, dim=-1)
        return torch.matmul(torch.exp(scores - lse.unsqueeze(-1)).to(values.dtype), values), lse
    return run


def _flex_peer(q, keys, values, scale):
    """torch.compile(flex_attention) with the LSE returned (GPU only)."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, keys, values, scale=scale, return_lse=True)


def flash_decode_case(batch: int, num_q_heads: int, num_kv_heads: int, head_dim_k: int, head_dim_v: int,
                      seq_len: int, block_size: int | None, kv_dtype: torch.dtype, device: str, label: str,
                      peers: tuple[str, ...] = ("sdpa_flash",), num_queries: int = 1) -> Case:
    """Decode attention over seq_len tokens per sequence. block_size None lays each sequence's
    cache out contiguously (one block per sequence); otherwise blocks of block_size, dealt to
    the sequences in a shuffled order. MLA when head_dim_k != head_dim_v (V inside the K entry).
    q is bf16, or fp32 with an fp32 cache (a CPU-only dtype). Peers read K/V in q's dtype laid
    out contiguously as they want it; flex_attention (compiled per shape, which takes a while)
    only where a shape asks for it. num_queries > 1: q [B, Q, Hq, Dk] (speculative decoding's
    drafts, causal over the last Q keys); the peers then attend with Q x group query rows per KV
    head over the whole cache, unmasked (the same reads and products)."""
    mla = head_dim_k != head_dim_v
    q_dtype = torch.float32 if kv_dtype == torch.float32 else torch.bfloat16
    block = seq_len if block_size is None else block_size
    blocks_per_seq = math.ceil(seq_len / block)
    num_blocks = batch * blocks_per_seq
    order = torch.arange(num_blocks) if block_size is None else torch.randperm(num_blocks)
    block_table = order.view(batch, blocks_per_seq).to(torch.int32).to(device)
    fp8 = kv_dtype == torch.float8_e4m3fn
    q_rows = (batch, num_q_heads) if num_queries == 1 else (batch, num_queries, num_q_heads)
    q = torch.randn(*q_rows, head_dim_k, dtype=q_dtype, device=device)
    k_cache = torch.randn(num_blocks, block, num_kv_heads, head_dim_k, device=device, dtype=q_dtype).to(kv_dtype)
    v_cache = None if mla else torch.randn(num_blocks, block, num_kv_heads, head_dim_v, device=device,
                                           dtype=q_dtype).to(kv_dtype)
    seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device=device)
    scale = head_dim_k ** -0.5
    k_scale = torch.tensor(1.0, device=device) if fp8 else None
    v_scale = torch.tensor(1.0, device=device) if fp8 and not mla else None
    head_dim_v_arg = head_dim_v if mla else -1

    traffic = flash_decode_traffic(label, batch, num_q_heads, num_kv_heads, head_dim_k, head_dim_v, seq_len,
                                   block_size, kv_dtype, num_queries)

    # Peers: K/V in q's dtype as [B, Hkv, L, D] contiguous, queries grouped per KV head.
    group = num_q_heads // num_kv_heads
    # [B, Hkv, Q * group, Dk]: every query token's rows of a KV head together.
    peer_q = q.view(batch, num_queries, num_kv_heads, group, head_dim_k).transpose(1, 2).reshape(
        batch, num_kv_heads, num_queries * group, head_dim_k)
    peer_keys = torch.randn(batch, num_kv_heads, seq_len, head_dim_k, dtype=q_dtype, device=device)
    peer_values = peer_keys[..., :head_dim_v] if mla else torch.randn(batch, num_kv_heads, seq_len, head_dim_v,
                                                                      dtype=q_dtype, device=device)
    candidates = []
    kv_name = DTYPE_NAMES[q_dtype]
    # torch's flash kernels take neither Dk != Dv (MLA) nor, on CUDA, Dk > 256.
    if "sdpa_flash" in peers and not mla and (device == "cpu" or head_dim_k <= 256):
        candidates.append((f"torch flash SDPA ({kv_name} KV)", _sdpa_flash_peer(peer_q, peer_keys, peer_values, scale)))
    if "eager" in peers:
        candidates.append((f"eager torch matmuls + logsumexp ({kv_name} KV)",
                           _eager_peer(peer_q, peer_keys, peer_values, scale)))
    if "flex" in peers and device == "cuda":
        candidates.append((f"torch.compile(flex_attention) ({kv_name} KV)",
                           _flex_peer(peer_q, peer_keys, peer_values.contiguous(), scale)))
    return Case(
        op="flash_decode",
        shape=traffic.shape,
        bytes_moved=traffic.bytes_moved,
        run=lambda: helix_ext.flash_decode(q, k_cache, v_cache, block_table, seq_lens, scale, head_dim_v_arg,
                                           k_scale, v_scale),
        peers=candidates,
    )


def fp4_grouped_gemm_case(label: str, num_experts: int, n: int, k: int, tokens_per_expert: int, fmt: str,
                          device: str) -> Case:
    """y = x @ dequant(w[e]).T for every expert's rows; all experts busy (the roofline case).
    Peers: torch._grouped_mm on bf16 weights of the same shapes (4x the weight bytes), and
    dequantize_fp4 followed by torch._grouped_mm or by one torch.matmul per expert."""
    tokens = num_experts * tokens_per_expert
    block = 16 if fmt == "nvfp4" else 32
    dense = torch.randn(num_experts * n, k, device=device, dtype=torch.bfloat16)
    packed, scales, global_scale = helix_ext.quantize_fp4(dense, fmt)
    w = packed.view(num_experts, n, k // 2)
    w_scales = scales.view(num_experts, n, k // block)
    w_global = global_scale.reshape(1).expand(num_experts).contiguous()
    x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
    offs = torch.arange(1, num_experts + 1, device=device, dtype=torch.int32) * tokens_per_expert
    traffic = fp4_grouped_gemm_traffic(label, num_experts, n, k, tokens_per_expert, fmt)
    dense_t = dense.view(num_experts, n, k).transpose(-2, -1)  # [E, K, N] as _grouped_mm takes it

    def dequantize_then_grouped_mm():
        weights = helix_ext.dequantize_fp4(packed, scales, global_scale, fmt, torch.bfloat16)
        return torch._grouped_mm(x, weights.view(num_experts, n, k).transpose(-2, -1), offs=offs)

    def dequantize_then_matmuls():
        weights = helix_ext.dequantize_fp4(packed, scales, global_scale, fmt, torch.bfloat16).view(num_experts, n, k)
        return [x[e * tokens_per_expert:(e + 1) * tokens_per_expert] @ weights[e].T for e in range(num_experts)]

    return Case(
        op="fp4_grouped_gemm",
        shape=traffic.shape,
        bytes_moved=traffic.bytes_moved,
        run=lambda: helix_ext.fp4_grouped_gemm(x, w, w_scales, w_global, offs, fmt),
        peers=[("torch._grouped_mm (bf16 weights)", lambda: torch._grouped_mm(x, dense_t, offs=offs)),
               ("dequantize_fp4 + torch._grouped_mm", dequantize_then_grouped_mm),
               ("dequantize_fp4 + torch.matmul per expert", dequantize_then_matmuls)],
    )


def quantize_fp4_case(label: str, rows: int, cols: int, fmt: str, given_global: bool, device: str) -> Case:
    """Quantize a bf16 matrix; NVFP4 either derives its global scale (an amax pass) or takes one."""
    x = torch.randn(rows, cols, device=device, dtype=torch.bfloat16)
    global_scale = torch.tensor(0.001, device=device) if given_global else None
    traffic = quantize_fp4_traffic(label, rows, cols, fmt, given_global)
    return Case(
        op="quantize_fp4",
        shape=traffic.shape,
        bytes_moved=traffic.bytes_moved,
        run=lambda: helix_ext.quantize_fp4(x, fmt, global_scale),
        peers=[("eager torch (same math, reference)", lambda: quantize_fp4_reference(x, fmt, global_scale))],
    )


def _virtual_peers(num_peers: int, rows: int, heads: int, dim: int, dtype: torch.dtype, device: str):
    """P peers' partial states on one device, each peer's flag for slot 0 raised once and this
    rank's epoch at 1: every later combine finds its flags ready and just merges."""
    outs = [torch.randn(rows, heads, dim, device=device, dtype=dtype) for _ in range(num_peers)]
    lses = [torch.randn(rows, heads, device=device) * 3 for _ in range(num_peers)]
    flags = [torch.ones(1, dtype=torch.int32, device=device) for _ in range(num_peers)]
    epoch = torch.ones(1, dtype=torch.int32, device=device)
    return outs, lses, flags, epoch, torch.zeros(1, dtype=torch.int32, device=device)


def hopb_combine_case(num_peers: int, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: str) -> Case:
    """The fused combine reading P "peers" (same-device buffers, flags ready): bytes read from
    the peers + written. Peer: merge_states over the same parts already gathered (what the
    "nccl" backend runs after its all-to-all)."""
    outs, lses, flags, epoch, error = _virtual_peers(num_peers, batch, heads, head_dim, dtype, device)
    stacked_out, stacked_lse = torch.stack(outs), torch.stack(lses)
    traffic = hopb_combine_traffic(num_peers, batch, heads, head_dim, dtype)
    return Case(
        op="hopb_combine",
        shape=traffic.shape,
        bytes_moved=traffic.bytes_moved,
        run=lambda: torch.ops.helix.hopb_combine(outs, lses, flags, epoch, 0, 10.0, error),
        peers=[("merge_states on gathered parts", lambda: helix_ext.merge_states(stacked_out, stacked_lse))],
    )


def hopb_overlap_case(chunks: int, device: str) -> Case:
    """HOP-B on one GPU: n batch chunks, each an attention (flash_decode, G2-like, 8 sequences of
    16384 tokens) then an exchange (the fused combine of 8 virtual peers, D=512). Timed:
    pipelined (combines on a side stream after events) against serial (one stream); the
    printed ideal is max(n*t_c + t_m, t_c + n*t_m) from the two timed alone."""
    attention = flash_decode_case(8, 64, 8, 128, 128, 16384, 64, torch.bfloat16, device, "chunk", peers=())
    exchange = hopb_combine_case(8, 64, 16, 512, torch.bfloat16, device)
    side = torch.cuda.Stream() if device == "cuda" else None

    def serial():
        for _ in range(chunks):
            attention.run()
            exchange.run()

    def pipelined():
        if side is None:
            return serial()
        main = torch.cuda.current_stream()
        for _ in range(chunks):
            attention.run()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                exchange.run()
        main.wait_stream(side)

    return Case(op="hopb_overlap", shape=f"n={chunks} chunks: G2-chunk attention + 8-peer combine",
                bytes_moved=chunks * (attention.bytes_moved + exchange.bytes_moved), run=pipelined,
                peers=[("serial (one stream)", serial)], overlap_parts=(chunks, attention.run, exchange.run))


# The standard shape of each op (the one the cupy cross-check times) comes first.
STANDARD = {
    "merge_states": dict(num_parts=8, batch=64, heads=128, head_dim=512, dtype=torch.bfloat16),
    "flash_decode": dict(label="G1", batch=8, num_q_heads=16, num_kv_heads=1, head_dim_k=128, head_dim_v=128,
                         seq_len=131072, block_size=64, kv_dtype=torch.bfloat16, peers=("sdpa_flash", "flex")),
    "fp4_grouped_gemm": dict(label="F1", num_experts=32, n=4096, k=7168, tokens_per_expert=8, fmt="nvfp4"),
    "quantize_fp4": dict(label="Q1", rows=4096, cols=7168, fmt="nvfp4", given_global=False),
    "hopb_combine": dict(num_peers=8, batch=64, heads=16, head_dim=512, dtype=torch.bfloat16),
}
_FP4_GEMM_HEADLINES = [
    dict(label="F2", num_experts=32, n=7168, k=2048, tokens_per_expert=8, fmt="nvfp4"),
    dict(label="F3", num_experts=1, n=13312, k=16384, tokens_per_expert=8, fmt="nvfp4"),
    dict(label="F4", num_experts=32, n=4096, k=7168, tokens_per_expert=1, fmt="nvfp4"),
]
_QUANTIZE_HEADLINES = [
    dict(label="Q1", rows=4096, cols=7168, fmt="nvfp4", given_global=True),
    dict(label="Q1", rows=4096, cols=7168, fmt="mxfp4", given_global=False),
]
_FLASH_DECODE_HEADLINES = [
    dict(label="G2", batch=32, num_q_heads=64, num_kv_heads=8, head_dim_k=128, head_dim_v=128, seq_len=16384,
         block_size=64, kv_dtype=torch.bfloat16),
    dict(label="G3", batch=1, num_q_heads=8, num_kv_heads=1, head_dim_k=128, head_dim_v=128, seq_len=4096,
         block_size=64, kv_dtype=torch.bfloat16),
    dict(label="M1", batch=16, num_q_heads=128, num_kv_heads=1, head_dim_k=576, head_dim_v=512, seq_len=16384,
         block_size=64, kv_dtype=torch.bfloat16, peers=("flex",)),
    dict(label="M2", batch=64, num_q_heads=128, num_kv_heads=1, head_dim_k=576, head_dim_v=512, seq_len=4096,
         block_size=64, kv_dtype=torch.bfloat16, peers=("flex",)),
    dict(label="G1", batch=8, num_q_heads=16, num_kv_heads=1, head_dim_k=128, head_dim_v=128, seq_len=131072,
         block_size=64, kv_dtype=torch.float8_e4m3fn),
    dict(label="M1", batch=16, num_q_heads=128, num_kv_heads=1, head_dim_k=576, head_dim_v=512, seq_len=16384,
         block_size=64, kv_dtype=torch.float8_e4m3fn),
]
# Quick mode runs these besides the standard shapes: they carry the targets.
QUICK_EXTRA = {"merge_states": [], "flash_decode": _FLASH_DECODE_HEADLINES, "fp4_grouped_gemm": _FP4_GEMM_HEADLINES,
               "quantize_fp4": _QUANTIZE_HEADLINES, "hopb_combine": []}
EXTRA = {
    "merge_states": [
        dict(num_parts=2, batch=64, heads=128, head_dim=512, dtype=torch.bfloat16),
        dict(num_parts=4, batch=32, heads=32, head_dim=128, dtype=torch.bfloat16),
        dict(num_parts=16, batch=8, heads=64, head_dim=512, dtype=torch.float16),
        dict(num_parts=8, batch=64, heads=32, head_dim=128, dtype=torch.float32),
    ],
    "flash_decode": _FLASH_DECODE_HEADLINES + [
        # Speculative decoding: the last accepted token and 1 or 3 drafts per sequence.
        *[dict(label="G1", batch=8, num_q_heads=16, num_kv_heads=1, head_dim_k=128, head_dim_v=128, seq_len=131072,
               block_size=64, kv_dtype=torch.bfloat16, num_queries=q) for q in (2, 4)],
        *[dict(label="M1", batch=16, num_q_heads=128, num_kv_heads=1, head_dim_k=576, head_dim_v=512, seq_len=16384,
               block_size=64, kv_dtype=torch.bfloat16, peers=("flex",), num_queries=q) for q in (2, 4)],
        # The same shapes with the cache laid out contiguously (one block per sequence).
        dict(label="G1", batch=8, num_q_heads=16, num_kv_heads=1, head_dim_k=128, head_dim_v=128, seq_len=131072,
             block_size=None, kv_dtype=torch.bfloat16),
        dict(label="M1", batch=16, num_q_heads=128, num_kv_heads=1, head_dim_k=576, head_dim_v=512, seq_len=16384,
             block_size=None, kv_dtype=torch.bfloat16),
    ],
    "fp4_grouped_gemm": _FP4_GEMM_HEADLINES + [
        dict(label="F1", num_experts=32, n=4096, k=7168, tokens_per_expert=8, fmt="mxfp4"),
        dict(label="P1", num_experts=8, n=4096, k=7168, tokens_per_expert=512, fmt="nvfp4"),  # prefill-sized
    ],
    "quantize_fp4": _QUANTIZE_HEADLINES,
    "hopb_combine": [dict(num_peers=2, batch=64, heads=64, head_dim=512, dtype=torch.bfloat16)],
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
    "fp4_grouped_gemm": [dict(label="smoke", num_experts=4, n=64, k=256, tokens_per_expert=2, fmt="nvfp4")],
    "quantize_fp4": [dict(label="smoke", rows=64, cols=256, fmt="mxfp4", given_global=False)],
    "hopb_combine": [dict(num_peers=3, batch=4, heads=4, head_dim=64, dtype=torch.bfloat16)],
}
# The CPU's shapes: what a 2-core machine runs in milliseconds (the GPU shapes would take
# minutes). flash_decode: GQA groups 16, 8 and 1 at D 128, MLA 576/512 with 16 heads; bf16,
# fp32 and fp8 KV. The standard shape of each op comes first.
_CPU_FLASH = dict(num_kv_heads=1, head_dim_k=128, head_dim_v=128, block_size=64)
CPU_STANDARD = {
    "merge_states": STANDARD["merge_states"],
    "flash_decode": dict(label="C1", batch=1, num_q_heads=16, seq_len=32768, kv_dtype=torch.bfloat16, **_CPU_FLASH),
    "fp4_grouped_gemm": dict(label="CF1", num_experts=8, n=2048, k=2048, tokens_per_expert=1, fmt="nvfp4"),
    "quantize_fp4": dict(label="CQ1", rows=1024, cols=7168, fmt="nvfp4", given_global=False),
    "hopb_combine": STANDARD["hopb_combine"],
}
CPU_EXTRA = {
    "merge_states": [
        dict(num_parts=4, batch=32, heads=32, head_dim=128, dtype=torch.bfloat16),
        dict(num_parts=8, batch=64, heads=32, head_dim=128, dtype=torch.float32),
    ],
    "flash_decode": [
        dict(label="C1", batch=1, num_q_heads=16, seq_len=32768, kv_dtype=torch.float32, **_CPU_FLASH),
        dict(label="C1", batch=1, num_q_heads=16, seq_len=32768, kv_dtype=torch.float8_e4m3fn, **_CPU_FLASH),
        dict(label="C2", batch=8, num_q_heads=16, seq_len=8192, kv_dtype=torch.bfloat16, **_CPU_FLASH),
        dict(label="C2", batch=8, num_q_heads=16, seq_len=8192, kv_dtype=torch.float32, **_CPU_FLASH),
        dict(label="C3", batch=4, num_q_heads=32, seq_len=8192, kv_dtype=torch.bfloat16,
             **{**_CPU_FLASH, "num_kv_heads": 4}),
        dict(label="C3", batch=4, num_q_heads=32, seq_len=8192, kv_dtype=torch.float32,
             **{**_CPU_FLASH, "num_kv_heads": 4}),
        dict(label="C4", batch=4, num_q_heads=8, seq_len=8192, kv_dtype=torch.bfloat16,
             **{**_CPU_FLASH, "num_kv_heads": 8}),
        dict(label="C4", batch=4, num_q_heads=8, seq_len=8192, kv_dtype=torch.float32,
             **{**_CPU_FLASH, "num_kv_heads": 8}),
        dict(label="CM", batch=2, num_q_heads=16, num_kv_heads=1, head_dim_k=576, head_dim_v=512, seq_len=8192,
             block_size=64, kv_dtype=torch.bfloat16, peers=("eager",)),
        dict(label="CM", batch=2, num_q_heads=16, num_kv_heads=1, head_dim_k=576, head_dim_v=512, seq_len=8192,
             block_size=64, kv_dtype=torch.float8_e4m3fn, peers=("eager",)),
        # Speculative decoding: 4 query tokens per sequence (the KV read once for all).
        dict(label="C1", batch=1, num_q_heads=16, seq_len=32768, kv_dtype=torch.bfloat16, num_queries=4,
             **_CPU_FLASH),
        dict(label="CM", batch=2, num_q_heads=16, num_kv_heads=1, head_dim_k=576, head_dim_v=512, seq_len=8192,
             block_size=64, kv_dtype=torch.bfloat16, peers=("eager",), num_queries=4),
    ],
    "fp4_grouped_gemm": [
        dict(label="CF1", num_experts=8, n=2048, k=2048, tokens_per_expert=1, fmt="mxfp4"),
        dict(label="CF2", num_experts=8, n=2048, k=2048, tokens_per_expert=32, fmt="nvfp4"),  # T = 256
    ],
    "quantize_fp4": [dict(label="CQ1", rows=1024, cols=7168, fmt="mxfp4", given_global=False)],
    "hopb_combine": [],
}
BUILDERS = {"merge_states": merge_states_case, "flash_decode": flash_decode_case,
            "fp4_grouped_gemm": fp4_grouped_gemm_case, "quantize_fp4": quantize_fp4_case,
            "hopb_combine": hopb_combine_case}


def cases(device: str, mode: str) -> Iterator[Case]:
    """mode: 'smoke', 'quick' (standard + headline shapes) or 'full' (all shapes); the CPU runs
    its own shapes (CPU_STANDARD, CPU_EXTRA) in both. Cases are
    built one at a time, so only one case's tensors are alive at once; each op's standard
    shape comes first."""
    for op, builder in BUILDERS.items():
        if mode == "smoke":
            shapes = SMOKE[op]
        elif device == "cpu":  # quick and full alike: the full mode only repeats more
            shapes = [CPU_STANDARD[op]] + CPU_EXTRA[op]
        elif mode == "quick":
            shapes = [STANDARD[op]] + QUICK_EXTRA[op]
        else:
            shapes = [STANDARD[op]] + EXTRA[op]
        for shape in shapes:
            yield builder(device=device, **shape)
    if device == "cuda" and mode != "smoke":
        yield hopb_overlap_case(4, device)  # HOP-B overlap efficiency (a side stream needs a GPU)
