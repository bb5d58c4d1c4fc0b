"""Proof that the harness can fail: each defect planted in a kernel (HELIX_PLANT, compiled into
helix_ext._simt only) is caught by the same checks the emulated tests run, and the same case
passes with the defect off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helix_ext import simt
from test_flash_decode import Case

pytestmark = pytest.mark.simt

ROOT = Path(__file__).resolve().parents[2]


def flash_case():
    # Lengths off the tile (64) and page (16) grids; several tiles per split.
    return Case([17, 150, 200], num_q_heads=8, num_kv_heads=2, head_dim_k=64, device="simt")


def test_the_defects_are_built_in():
    assert simt.module().planted_defects_built
    assert set(simt.planted_defects()) == {"missing_barrier", "wait_group_off_by_one", "swapped_fragment",
                                           "tile_bound_off_by_one", "loop_bound_off_by_one", "missing_release_fence",
                                           "missing_exchange_barrier"}


@pytest.mark.parametrize("defect", ["missing_barrier", "wait_group_off_by_one", "swapped_fragment",
                                    "tile_bound_off_by_one"])
def test_flash_decode_defect_is_caught(defect):
    case = flash_case()
    case.check(num_splits=1)  # the harness passes the real kernel...
    with pytest.raises((AssertionError, RuntimeError)):
        case.check(num_splits=1, planted_defect=defect)  # ...and fails the planted one


def test_missing_score_exchange_barrier_is_caught():
    # MLA: the two Dv warps of a head tile add each other's partial scores from shared memory;
    # without the barrier a warp reads its partner's slot before (poisoned) or after this tile's
    # write, depending on the schedule.
    case = Case([40, 100], num_q_heads=16, num_kv_heads=1, head_dim_k=576, head_dim_v=512, block_size=64,
                mla=True, device="simt")
    case.check(num_splits=1)
    with pytest.raises((AssertionError, RuntimeError)):
        case.check(num_splits=1, planted_defect="missing_exchange_barrier")


def test_loop_bound_off_by_one_is_caught_by_address_sanitizer():
    # The merge's grid-stride loop runs one vector past the end: ASan stops the process at the
    # out-of-bounds access. (A child process, since the report ends it.)
    code = ("import torch, helix_ext.simt as s\n"
            "x = torch.randn(3, 2, 5, 8); lse = torch.randn(3, 2, 5)\n"
            "torch.ops.helix_simt.merge_states(x, lse)\n"
            "print('clean run passed', flush=True)\n"
            "with s.settings(planted_defect='loop_bound_off_by_one'):\n"
            "    torch.ops.helix_simt.merge_states(x, lse)\n"
            "print('defect not caught')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ), timeout=300)
    assert "clean run passed" in result.stdout, result.stderr[-3000:]
    assert result.returncode != 0 and "defect not caught" not in result.stdout
    assert "AddressSanitizer: heap-buffer-overflow" in result.stderr, result.stderr[-3000:]


def test_missing_release_fence_is_caught():
    simt.module().reset_publications()
    own, peer = torch.zeros(4, dtype=torch.int32), torch.zeros(4, dtype=torch.int32)
    epoch = torch.zeros(4, dtype=torch.int32)
    outs = [torch.randn(3, 2, 8) for _ in range(2)]
    lses = [torch.randn(3, 2) for _ in range(2)]
    error = torch.zeros(1, dtype=torch.int32)
    torch.ops.helix_simt.hopb_signal(own, epoch, 0)
    torch.ops.helix_simt.hopb_signal(peer, torch.zeros(4, dtype=torch.int32), 0)
    torch.ops.helix_simt.hopb_combine(outs, lses, [own, peer], epoch, 0, 5.0, error)  # published: fine
    with simt.settings(planted_defect="missing_release_fence"):
        torch.ops.helix_simt.hopb_signal(own, epoch, 0)
        torch.ops.helix_simt.hopb_signal(peer, torch.ones(4, dtype=torch.int32), 0)
    with pytest.raises(RuntimeError, match="missing release fence"):
        torch.ops.helix_simt.hopb_combine(outs, lses, [own, peer], epoch, 0, 5.0, error)
    simt.module().reset_publications()
