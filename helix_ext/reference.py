"""Pure-torch references of the helix ops: the ground truth of tests and benchmarks.

They favour clarity over speed, run on any device, and compute in ``compute_dtype``
(float64 by default) so that tests can measure a kernel's error against the exact result.
"""

from __future__ import annotations

import torch


def merge_states_reference(parts_out: torch.Tensor, parts_lse: torch.Tensor, *,
                           compute_dtype: torch.dtype = torch.float64,
                           out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``helix.merge_states``: ``(out [B, H, D], lse [B, H])``.

    ``-inf`` parts are absent (their values never used); a row with every part absent gives
    0 and ``-inf``; a NaN or ``+inf`` LSE among a row's parts gives NaN in out and lse.
    Weights are ``exp(LSE_i - max) / sum``, relative to the largest LSE.
    ``out`` is returned in ``out_dtype`` (default: ``parts_out``'s dtype) and ``lse`` in
    float32, or both in ``compute_dtype`` when ``out_dtype=compute_dtype`` is asked for.
    """
    values = parts_out.to(compute_dtype)
    part_lse = parts_lse.to(compute_dtype)
    poisoned = (torch.isnan(part_lse) | (part_lse == float("inf"))).any(dim=0)
    present = part_lse != float("-inf")
    largest = part_lse.amax(dim=0) if part_lse.shape[0] else torch.full(part_lse.shape[1:], float("-inf"),
                                                                        dtype=compute_dtype, device=part_lse.device)
    largest = torch.where(torch.isfinite(largest), largest, torch.zeros_like(largest))
    weights = torch.where(present, torch.exp(part_lse - largest), torch.zeros_like(part_lse))
    total = weights.sum(dim=0)
    # Absent parts are masked, not multiplied by 0, so garbage (NaN) in them stays out.
    weighted = torch.where(present.unsqueeze(-1), weights.unsqueeze(-1) * values, torch.zeros_like(values))
    nonempty = total > 0
    out = weighted.sum(dim=0) / torch.where(nonempty, total, torch.ones_like(total)).unsqueeze(-1)
    lse = torch.where(nonempty, largest + torch.log(torch.where(nonempty, total, torch.ones_like(total))),
                      torch.full_like(total, float("-inf")))
    out = torch.where(poisoned.unsqueeze(-1), torch.full_like(out, float("nan")), out)
    lse = torch.where(poisoned, torch.full_like(lse, float("nan")), lse)
    out_dtype = parts_out.dtype if out_dtype is None else out_dtype
    lse_dtype = compute_dtype if out_dtype == compute_dtype else torch.float32
    return out.to(out_dtype), lse.to(lse_dtype)


def hopb_all_reduce_reference(peer_parts: list[torch.Tensor], *, compute_dtype: torch.dtype = torch.float64,
                              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """hopb_all_reduce's value: the sum of the peers' parts (each the same shape), in peer order,
    accumulated in compute_dtype (float64: the exact reference; float32: the kernels' own
    order, which they match bit for bit), returned in out_dtype (default the parts' dtype)."""
    total = torch.zeros(peer_parts[0].shape, dtype=compute_dtype, device=peer_parts[0].device)
    for part in peer_parts:
        total = total + part.to(compute_dtype)
    return total.to(out_dtype or peer_parts[0].dtype)


def gather_kv(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` token entries of one sequence from a paged cache: [length, Hkv, D]."""
    block_size = cache.shape[1]
    tokens = torch.arange(length, device=cache.device)
    blocks = block_table_row.to(cache.device).long()[tokens // block_size]
    return cache[blocks, tokens % block_size]


def flash_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, softmax_scale: float,
                           head_dim_v: int = -1, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None, query_key_lens: torch.Tensor | None = None, *,
                           compute_dtype: torch.dtype = torch.float64,
                           probability_dtype: torch.dtype | None = None,
                           out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``helix.flash_decode``: ``(out [B, Hq, Dv], lse [B, Hq])``, or with several
    query tokens per sequence (q ``[B, Q, Hq, Dk]``) ``(out [B, Q, Hq, Dv], lse [B, Q, Hq])``.

    Query i of sequence b attends to the first ``query_key_lens[b, i]`` of the shard's keys
    (``[B, Q]``; with a 3-D q, ``[B, 1]``); the default is causal over the last Q keys,
    ``max(0, seq_lens[b] - Q + 1 + i)``. Each query token is the single-token attention over
    that many keys: what follows describes one.

    Decode attention of each sequence's single query token over its ``seq_lens[b]`` cached
    tokens (paged through ``block_table``), query head h reading KV head ``h // (Hq // Hkv)``.
    ``v_cache=None`` is MLA's absorbed form: V is the first ``head_dim_v`` dims of the K entry,
    scaled by ``k_scale``. A sequence of length 0 gives ``out = 0`` and ``lse = -inf``; a NaN
    or ``+inf`` score gives NaN in that (b, h) row's out and lse.

    ``probability_dtype`` rounds the normalized probabilities to that dtype before they
    weight V (what a tensor-core kernel does); ``out`` comes back in ``out_dtype`` (default
    q's dtype), ``lse`` in float32 unless ``out_dtype == compute_dtype``.
    """
    if q.dim() == 4 or query_key_lens is not None:
        queries = q if q.dim() == 4 else q.unsqueeze(1)
        num_queries = queries.shape[1]
        if query_key_lens is None:
            offsets = torch.arange(num_queries, device=seq_lens.device) - num_queries + 1
            query_key_lens = (seq_lens.to(torch.int64)[:, None] + offsets[None, :]).clamp(min=0)
        parts = [flash_decode_reference(queries[:, i], k_cache, v_cache, block_table, query_key_lens[:, i],
                                        softmax_scale, head_dim_v, k_scale, v_scale, compute_dtype=compute_dtype,
                                        probability_dtype=probability_dtype, out_dtype=out_dtype)
                 for i in range(num_queries)]
        out, lse = torch.stack([p[0] for p in parts], 1), torch.stack([p[1] for p in parts], 1)
        return (out, lse) if q.dim() == 4 else (out[:, 0], lse[:, 0])
    batch, num_q_heads, head_dim_k = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if v_cache is None:
        head_dim_v = head_dim_k if head_dim_v == -1 else head_dim_v
        v_source, v_multiplier = k_cache[..., :head_dim_v], k_scale
    else:
        head_dim_v = v_cache.shape[3]
        v_source, v_multiplier = v_cache, v_scale
    k_multiplier = 1.0 if k_scale is None else k_scale.to(compute_dtype).item()
    v_multiplier = 1.0 if v_multiplier is None else v_multiplier.to(compute_dtype).item()
    out = torch.zeros(batch, num_q_heads, head_dim_v, dtype=compute_dtype, device=q.device)
    lse = torch.full((batch, num_q_heads), float("-inf"), dtype=compute_dtype, device=q.device)
    for b in range(batch):
        length = int(seq_lens[b])
        if length == 0:
            continue
        keys = gather_kv(k_cache, block_table[b], length).to(compute_dtype) * k_multiplier
        values = gather_kv(v_source, block_table[b], length).to(compute_dtype) * v_multiplier
        keys = keys.repeat_interleave(group, dim=1)  # [L, Hq, Dk]
        values = values.repeat_interleave(group, dim=1)  # [L, Hq, Dv]
        scores = torch.einsum("hd,lhd->hl", q[b].to(compute_dtype), keys) * softmax_scale
        poisoned = (torch.isnan(scores) | (scores == float("inf"))).any(dim=-1)  # [Hq]
        lse[b] = torch.logsumexp(scores, dim=-1)
        probabilities = torch.softmax(scores, dim=-1)
        if probability_dtype is not None:
            probabilities = probabilities.to(probability_dtype).to(compute_dtype)
        out[b] = torch.einsum("hl,lhd->hd", probabilities, values)
        out[b][poisoned] = float("nan")
        lse[b][poisoned] = float("nan")
    out_dtype = q.dtype if out_dtype is None else out_dtype
    lse_dtype = compute_dtype if out_dtype == compute_dtype else torch.float32
    return out.to(out_dtype), lse.to(lse_dtype)


# ---------------------------------------------------------------------------------------
# FP4 (E2M1) formats: NVFP4 (E4M3 scale per 16 elements + fp32 global multiplier) and
# MXFP4 (E8M0 scale per 32 elements). Written independently of the C++ codec: rounding is
# "nearest grid point, ties to the even code" by explicit search, not by thresholds.

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_BLOCK = {"nvfp4": 16, "mxfp4": 32}


CANONICAL_NAN_BITS = {torch.float32: 0x7FC00000, torch.bfloat16: 0x7FC0, torch.float16: 0x7E00}
SAME_SIZE_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _fp4_block(fmt: str) -> int:
    if fmt not in FP4_BLOCK:
        raise ValueError(f"fmt must be 'nvfp4' or 'mxfp4', got {fmt!r}")
    return FP4_BLOCK[fmt]


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of 4-bit codes (uint8 tensor, low nibble used)."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=codes.device)
    codes = codes.long()
    magnitude = grid[codes & 7]
    return torch.where((codes & 8) != 0, -magnitude, magnitude)


def e2m1_encode(values: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (uint8) of each float32 value: ties to the even code, saturation
    at +-6, NaN -> 0, values rounding to zero -> +0."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float64, device=values.device)
    magnitude = values.double().abs().nan_to_num(nan=0.0).clamp(max=6.0)
    distance = (magnitude.unsqueeze(-1) - grid).abs()
    nearest = distance == distance.min(dim=-1, keepdim=True).values
    even = (torch.arange(8, device=values.device) % 2 == 0)
    # Among the (at most two, adjacent) nearest codes prefer the even one.
    code = torch.argmax(nearest.int() * torch.where(even, 2, 1), dim=-1)
    negative = (values < 0) & (code != 0)
    return (code | torch.where(negative, 8, 0)).to(torch.uint8)


def fp4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """[M, K/2] uint8 -> [M, K] codes: element 2i from the low nibble, 2i+1 from the high."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def fp4_pack(codes: torch.Tensor) -> torch.Tensor:
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)


def mxfp4_scale_values(codes: torch.Tensor) -> torch.Tensor:
    """2^(code - 127) in float32 (code 0 is 2^-127, an fp32 subnormal; 0xFF is NaN)."""
    values = torch.ldexp(torch.ones_like(codes, dtype=torch.float64), codes.long() - 127).float()
    return torch.where(codes.long() == 0xFF, torch.full_like(values, float("nan")), values)


def _block_multipliers(block_scales: torch.Tensor, global_scale: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "nvfp4":
        return block_scales.float() * global_scale.float().reshape(())
    return mxfp4_scale_values(block_scales)


def quantize_fp4_reference(x: torch.Tensor, fmt: str, global_scale: torch.Tensor | None = None):
    """Reference of ``helix.quantize_fp4``: ``(packed [M, K/2] uint8, block_scales, global_scale [])``."""
    block = _fp4_block(fmt)
    rows, cols = x.shape
    values = x.float()
    blocks = values.view(rows, cols // block, block)
    # NaN counts as 0 everywhere; +-inf saturates: FLT_MAX in its block's amax, left out of
    # the tensor's (so blocks without an inf quantize as if it were not there).
    float_max = torch.finfo(torch.float32).max
    block_amax = blocks.abs().nan_to_num(nan=0.0, posinf=float_max).amax(dim=-1)
    if fmt == "nvfp4":
        if global_scale is None:
            finite = torch.where(torch.isfinite(values), values.abs(), torch.zeros_like(values))
            amax = finite.max() if values.numel() else torch.tensor(0.0)
            global_value = amax / (6.0 * 448.0)  # float32 division, as the kernels do it
            if not global_value > 0:  # all zero, or an amax whose quotient underflows: never 0
                global_value = torch.tensor(1.0)
        else:
            global_value = global_scale.float().reshape(())
        global_value = global_value.float().to(x.device)
        scales = ((block_amax / 6.0) / global_value).nan_to_num(nan=0.0).clamp(2.0 ** -9, 448.0)
        scale_codes = scales.to(torch.float8_e4m3fn)
        divisors = scale_codes.float() * global_value
    else:
        _, exponent = torch.frexp(block_amax)  # block_amax = m * 2^exponent, m in [0.5, 1)
        exponent = torch.where(block_amax > 0, exponent - 1 - 2, torch.full_like(exponent, -127)).clamp(-127, 127)
        scale_codes = (exponent + 127).to(torch.uint8)
        divisors = mxfp4_scale_values(scale_codes)
        global_value = torch.tensor(1.0, device=x.device)
    codes = e2m1_encode(blocks / divisors.unsqueeze(-1)).view(rows, cols)
    return fp4_pack(codes), scale_codes, global_value.reshape(()).clone()


def dequantize_fp4_reference(packed: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                             fmt: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference of ``helix.dequantize_fp4``: ``e2m1(q) * (float(s) * global)`` (NVFP4) or
    ``e2m1(q) * 2^e`` (MXFP4), in fp32, returned in ``dtype``."""
    block = _fp4_block(fmt)
    values = e2m1_decode(fp4_unpack(packed))
    multipliers = _block_multipliers(block_scales, global_scale, fmt).repeat_interleave(block, dim=-1)
    out = values * multipliers
    # NaN scale codes give the canonical quiet NaN of the dtype (0x7FC00000 / 0x7E00 / 0x7FC0),
    # written as bits: torch's own conversions do not promise one NaN pattern.
    nan = torch.tensor(CANONICAL_NAN_BITS[dtype], dtype=SAME_SIZE_INT[dtype]).view(dtype).to(out.device)
    return torch.where(torch.isnan(out), nan, out.to(dtype))


def fp4_grouped_gemm_reference(x: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor,
                               w_global_scale: torch.Tensor, offs: torch.Tensor, fmt: str, *,
                               compute_dtype: torch.dtype = torch.float64,
                               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference of ``helix.fp4_grouped_gemm``: ``y[rows of e] = x[rows of e] @ dequant(w[e]).T``
    with group e's rows ``offs[e-1]:offs[e]`` (``torch._grouped_mm``'s end offsets); the
    per-expert global scale multiplies the output; rows past ``offs[-1]`` are zero."""
    tokens, _ = x.shape
    num_experts, n, _ = w.shape
    y = torch.zeros(tokens, n, dtype=compute_dtype, device=x.device)
    ends = offs.tolist()
    begin = 0
    for e in range(num_experts):
        end = ends[e]
        if end > begin:
            weights = dequantize_fp4_reference(w[e], w_scales[e], torch.tensor(1.0, device=w.device), fmt)
            y[begin:end] = (x[begin:end].to(compute_dtype) @ weights.to(compute_dtype).T) * \
                w_global_scale[e].to(compute_dtype)
        begin = end
    return y.to(x.dtype if out_dtype is None else out_dtype)
