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


def test_issued_tensor_work_counts_recomputed_scores_and_padding():
    from bench.kernels_report import flash_decode_issued_flops, flash_decode_mmas_per_warp_tile, flash_decode_template

    mla = flash_decode_template("flash_decode_kernel<Cfg<576,512,4,2,1,32,3,true>,bf16,false>")
    assert mla == dict(dk=576, dv=512, warps_m=4, warps_v=2, warps_t=1, tile=32, stages=3, shared_kv=True,
                       dtype="bf16", fp8=False)
    # Per warp and 32-token tile: 4 x 18 score MMAs over its half of the 576-deep K (the two V
    # warps split the reduction), 32 x 2 for its 256 V columns.
    assert flash_decode_mmas_per_warp_tile(mla) == 4 * 18 + 32 * 2
    algorithmic = 2 * 16 * 128 * 16384 * (576 + 512)  # M1: B 16, 128 heads, 16K tokens
    assert flash_decode_issued_flops(mla, 16, 128, 1, 16384) == algorithmic  # each score once
    repeated = dict(mla, warps_v=1, dv=256)  # a warp with all of DK: its scores in full
    assert flash_decode_mmas_per_warp_tile(repeated) == 4 * 36 + 32 * 2
    gqa = flash_decode_template("flash_decode_kernel<Cfg<128,128,1,1,4,64,3,false>,bf16,true>")
    assert flash_decode_issued_flops(gqa, 8, 16, 1, 131072) == 2 * 8 * 16 * 131072 * 256  # no waste
    assert flash_decode_issued_flops(gqa, 1, 8, 1, 4096) == 2 * 2 * 8 * 4096 * 256  # 8 heads padded to 16
    assert flash_decode_issued_flops(gqa, 1, 16, 1, 100) == 2 * 16 * 128 * 256  # 100 tokens: two 64-token tiles
    assert flash_decode_template("merge_states_kernel<bf16,bf16,8>") is None


@pytest.mark.skipif(not helix_ext.build_info()["with_cuda"], reason="helix_ext was built without CUDA kernels")
def test_the_configuration_predicts_the_mmas_in_the_sass():
    from bench.kernels_report import (demangle, flash_decode_instances, flash_decode_mmas_per_warp_tile, library,
                                      resource_usage, sass_histograms, short_name)

    binary = library()
    names = sorted({name for _, name in resource_usage(binary)})
    short = {k: short_name(v) for k, v in demangle(names).items()}
    histograms = sass_histograms(binary, "sm_90a")
    instances = flash_decode_instances({short[n]: histograms.get(n, Counter()) for n in names})
    assert len(instances) >= 4
    for name, (template, hmma) in instances.items():
        assert hmma == flash_decode_mmas_per_warp_tile(template), name
