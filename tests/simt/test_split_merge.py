"""flash_decode's split merge (merge_states_kernel with fp32 partials in and q's dtype out) in both
of its instances: the 16-byte one the launcher uses and the scalar one an odd head dim takes."""

from __future__ import annotations

import pytest
import torch

from helix_ext import simt
from helix_ext.reference import merge_states_reference
from test_merge_states import make_parts
from tolerance import assert_close_to_reference

pytestmark = pytest.mark.simt


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [7, 64])
def test_split_merge_instances(out_dtype, head_dim):
    parts_out, parts_lse = make_parts(5, 3, 4, head_dim, torch.float32, "cpu")
    out, lse = simt.run_all_schedules(torch.ops.helix_simt.probe_split_merge, parts_out, parts_lse, out_dtype)
    assert out.dtype == out_dtype
    ref_out, ref_lse = merge_states_reference(parts_out, parts_lse, out_dtype=torch.float64)
    base_out, _ = merge_states_reference(parts_out, parts_lse, compute_dtype=torch.float32)
    assert_close_to_reference(out, ref_out, base_out.to(out_dtype), accumulated_terms=5, name="out")
    base_lse = merge_states_reference(parts_out, parts_lse, compute_dtype=torch.float32)[1]
    assert_close_to_reference(lse, ref_lse, base_lse, accumulated_terms=5, name="lse")
