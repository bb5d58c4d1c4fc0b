"""bench/kernels_report.py: the static verdicts can fail, and bench/KERNELS.md is current."""

from collections import Counter

import pytest

import helix_ext
from bench.kernels_report import main, occupancy, verdict


def test_verdicts_flag_spills_scalar_loads_and_missing_tensor_cores():
    wide = Counter({"LDG.128": 4})
    assert verdict("merge_states_kernel<bf16,bf16,8>", {"REG": 64}, wide) == "OK"
    assert "local memory" in verdict("merge_states_kernel<bf16,bf16,8>", {"REG": 64, "LOCAL": 16}, wide)
    assert "local memory" in verdict("merge_states_kernel<bf16,bf16,8>", {"REG": 64}, Counter({"LDG.128": 1, "STL": 2}))
    assert "no 8/16-byte global loads" in verdict("merge_states_kernel<bf16,bf16,8>", {"REG": 64}, Counter())
    assert verdict("merge_states_kernel<bf16,bf16,1>", {"REG": 64}, Counter()) == "OK"  # the scalar fallback
    no_mma = Counter({"LDGSTS.128": 8})
    assert "no tensor-core" in verdict("flash_decode_kernel<Cfg<128,128,1,1,4,64,3,false>,bf16,false>",
                                       {"REG": 120}, no_mma)


def test_occupancy():
    assert occupancy(128, 256, 0) == 2          # 65536 registers / (256 threads x 128)
    assert occupancy(32, 256, 0) == 8           # 2048 threads per SM
    assert occupancy(64, 128, 200 * 1024) == 1  # shared memory bound


@pytest.mark.skipif(set(helix_ext.build_info()["cuda_archs"]) != {"sm_90a", "sm_100a"},
                    reason="bench/KERNELS.md describes the default build (CUDA kernels for sm_90a and sm_100a)")
def test_kernels_md_is_current():
    assert main(["--check"]) == 0, "run `python -m bench.kernels_report` and commit bench/KERNELS.md"
