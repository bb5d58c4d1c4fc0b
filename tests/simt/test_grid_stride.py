"""Grid-stride loops and split plans at a small SM count: with the emulated device's SM count
at 1 or 2 the launchers cap their grids, so every CTA's loop runs several rounds (on 132 SMs
the small test shapes never need a second round)."""

from __future__ import annotations

import pytest
import torch

from helix_ext import simt
from helix_ext.reference import (fp4_grouped_gemm_reference, merge_states_reference, quantize_fp4_reference)
from test_fp4 import make_experts, same_bits
from tolerance import assert_close_to_reference

pytestmark = pytest.mark.simt


def test_merge_states_grid_stride():
    # 8 * 64 rows of 512 bf16: 32768 vectors for at most 64 CTAs of 256 threads on one SM.
    parts_out = torch.randn(2, 8, 64, 512).bfloat16()
    parts_lse = torch.randn(2, 8, 64) * 3
    parts_lse[0, :, :3] = float("-inf")
    out, lse = simt.run_all_schedules(torch.ops.helix_simt.merge_states, parts_out, parts_lse,
                                      multiprocessor_count=1)
    ref_out, ref_lse = merge_states_reference(parts_out, parts_lse, out_dtype=torch.float64)
    base_out, base_lse = merge_states_reference(parts_out, parts_lse, compute_dtype=torch.float32)
    assert_close_to_reference(out, ref_out, base_out, accumulated_terms=2, name="out")
    assert_close_to_reference(lse, ref_lse, base_lse, accumulated_terms=2, name="lse")


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_quantize_grid_stride(fmt):
    # 16384 scale blocks (and 32768 amax vectors) for 32 CTAs of 256 threads on one SM.
    x = torch.randn(64, 4096).bfloat16()
    packed, scales, global_scale = simt.run_all_schedules(torch.ops.helix_simt.quantize_fp4, x, fmt,
                                                          multiprocessor_count=1)
    ref = quantize_fp4_reference(x, fmt)
    assert same_bits(packed, ref[0]) and same_bits(scales, ref[1]) and same_bits(global_scale, ref[2].float())


def test_grouped_gemm_split_k_finalize_grid_stride():
    # Two SMs: 3 column tiles < a wave of 4 CTAs, so K splits in two; the finalize's 64 x 384
    # outputs take several rounds of its 64 CTAs.
    w, scales, global_scales = make_experts(1, 384, 256, "nvfp4", "cpu")
    x = torch.randn(64, 256).bfloat16()
    offs = torch.tensor([60], dtype=torch.int32)
    y = simt.run_all_schedules(torch.ops.helix_simt.fp4_grouped_gemm, x, w, scales, global_scales, offs, "nvfp4",
                               multiprocessor_count=2)
    reference = fp4_grouped_gemm_reference(x, w, scales, global_scales, offs, "nvfp4", out_dtype=torch.float64)
    baseline = fp4_grouped_gemm_reference(x, w, scales, global_scales, offs, "nvfp4", compute_dtype=torch.float32)
    assert_close_to_reference(y, reference, baseline, accumulated_terms=256, name="y")
    assert torch.all(y[60:] == 0)
