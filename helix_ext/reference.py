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
