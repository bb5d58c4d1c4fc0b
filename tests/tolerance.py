"""Tolerances from a baseline, not magic numbers.

A kernel's error against a float64 reference must be within a small factor of the error
that plain PyTorch makes computing the same thing at its best in the same output dtype
(the baseline), plus a floor of a few units in the last place of the output dtype.
"""

from __future__ import annotations

import math

import torch


def _max_abs_error(value: torch.Tensor, reference: torch.Tensor, finite: torch.Tensor) -> float:
    if not finite.any():
        return 0.0
    return (value.double()[finite] - reference[finite]).abs().max().item()


def assert_close_to_reference(actual: torch.Tensor, reference: torch.Tensor, baseline: torch.Tensor,
                              *, factor: float = 2.0, ulps: float = 2.0, accumulated_terms: int = 1,
                              name: str = "output") -> None:
    """Check ``actual`` against the float64 ``reference``, with ``baseline`` setting the scale.

    Infinite reference entries must match exactly; NaN is never accepted where the
    reference has none and is required where it has one; finite entries must satisfy
    ``max|actual - ref| <= factor * max|baseline - ref| + floor`` with
    ``floor = (ulps * eps(dtype) + 2 * sqrt(accumulated_terms) * eps(fp32)) * max|ref|``:
    a few units in the last place of the output, plus the typical rounding of an fp32 sum of
    ``accumulated_terms`` terms (kernels accumulate sequentially, torch's baseline pairwise).
    """
    assert actual.shape == reference.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    actual64 = actual.detach().double().cpu()
    reference = reference.detach().double().cpu()
    baseline64 = baseline.detach().double().cpu()
    nan_in_actual = torch.isnan(actual64) & ~torch.isnan(reference)
    assert not nan_in_actual.any(), f"{name}: {int(nan_in_actual.sum())} NaN values where the reference has none"
    missing_nan = torch.isnan(reference) & ~torch.isnan(actual64)
    assert not missing_nan.any(), f"{name}: {int(missing_nan.sum())} entries are not NaN where the reference is NaN"
    infinite = torch.isinf(reference)
    mismatched = infinite & (actual64 != reference)
    assert not mismatched.any(), f"{name}: {int(mismatched.sum())} entries differ where the reference is infinite"
    finite = torch.isfinite(reference)
    error = _max_abs_error(actual64, reference, finite)
    baseline_error = _max_abs_error(baseline64, reference, finite)
    scale = reference[finite].abs().max().item() if finite.any() else 0.0
    fp32_sum_error = 2.0 * math.sqrt(accumulated_terms) * torch.finfo(torch.float32).eps
    floor = (ulps * torch.finfo(actual.dtype).eps + fp32_sum_error) * scale
    bound = factor * baseline_error + floor
    assert error <= bound, (f"{name}: max abs error {error:.3e} > bound {bound:.3e} "
                            f"(baseline error {baseline_error:.3e}, floor {floor:.3e}, dtype {actual.dtype})")
