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

    ``out`` is returned in ``out_dtype`` (default: ``parts_out``'s dtype) and ``lse`` in
    float32, or both in ``compute_dtype`` when ``out_dtype=compute_dtype`` is asked for.
    """
    values = parts_out.to(compute_dtype)
    part_lse = parts_lse.to(compute_dtype)
    lse = torch.logsumexp(part_lse, dim=0)  # -inf where every part is -inf
    present = (part_lse != float("-inf")) & (lse != float("-inf")).unsqueeze(0)
    weights = torch.where(present, torch.exp(part_lse - lse.unsqueeze(0)), torch.zeros_like(part_lse))
    # Absent parts are masked, not multiplied by 0, so garbage (NaN) in them stays out.
    weighted = torch.where(present.unsqueeze(-1), weights.unsqueeze(-1) * values, torch.zeros_like(values))
    out = weighted.sum(dim=0)
    out_dtype = parts_out.dtype if out_dtype is None else out_dtype
    lse_dtype = compute_dtype if out_dtype == compute_dtype else torch.float32
    return out.to(out_dtype), lse.to(lse_dtype)


def gather_kv(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` token entries of one sequence from a paged cache: [length, Hkv, D]."""
    block_size = cache.shape[1]
    tokens = torch.arange(length, device=cache.device)
    blocks = block_table_row.to(cache.device).long()[tokens // block_size]
    return cache[blocks, tokens % block_size]


def flash_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, softmax_scale: float,
                           head_dim_v: int = -1, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None, *, compute_dtype: torch.dtype = torch.float64,
                           probability_dtype: torch.dtype | None = None,
                           out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``helix.flash_decode``: ``(out [B, Hq, Dv], lse [B, Hq])``.

    Decode attention of each sequence's single query token over its ``seq_lens[b]`` cached
    tokens (paged through ``block_table``), query head h reading KV head ``h // (Hq // Hkv)``.
    ``v_cache=None`` is MLA's absorbed form: V is the first ``head_dim_v`` dims of the K entry,
    scaled by ``k_scale``. A sequence of length 0 gives ``out = 0`` and ``lse = -inf``.

    ``probability_dtype`` rounds the normalized probabilities to that dtype before they
    weight V (what a tensor-core kernel does); ``out`` comes back in ``out_dtype`` (default
    q's dtype), ``lse`` in float32 unless ``out_dtype == compute_dtype``.
    """
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
        lse[b] = torch.logsumexp(scores, dim=-1)
        probabilities = torch.softmax(scores, dim=-1)
        if probability_dtype is not None:
            probabilities = probabilities.to(probability_dtype).to(compute_dtype)
        out[b] = torch.einsum("hl,lhd->hd", probabilities, values)
    out_dtype = q.dtype if out_dtype is None else out_dtype
    lse_dtype = compute_dtype if out_dtype == compute_dtype else torch.float32
    return out.to(out_dtype), lse.to(lse_dtype)
