"""pytest-benchmark timings of merge_states at its standard shape (P=8, B=64, H=128, D=512,
bf16; the CPU runs B=8) against the same math in eager torch. The roofline numbers come
from `python -m bench`; these are for pytest-benchmark's comparison and history tools."""

import pytest
import torch

from bench.cases import merge_states_case


@pytest.mark.parametrize("impl", ["helix", "eager_torch"])
def test_merge_states(benchmark, bench_device, synchronized, impl):
    batch = 64 if bench_device == "cuda" else 8
    case = merge_states_case(8, batch, 128, 512, torch.bfloat16, bench_device)
    fn = case.run if impl == "helix" else case.peers[0][1]
    benchmark.extra_info.update(shape=case.shape, bytes_moved=case.bytes_moved)
    result = benchmark(synchronized(fn))
    assert result[0].shape == (batch, 128, 512)
