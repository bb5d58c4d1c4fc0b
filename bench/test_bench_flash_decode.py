"""pytest-benchmark timings of flash_decode at the latency shape G3 (B=1, Hq=8, Hkv=1, D=128,
4096 tokens, paged 64; the CPU runs 1024 tokens) against torch's flash SDPA. The roofline
numbers of every headline shape come from `python -m bench`."""

import pytest
import torch

from bench.cases import flash_decode_case


@pytest.mark.parametrize("impl", ["helix", "torch_flash_sdpa"])
def test_flash_decode_g3(benchmark, bench_device, synchronized, impl):
    seq_len = 4096 if bench_device == "cuda" else 1024
    case = flash_decode_case(1, 8, 1, 128, 128, seq_len, 64, torch.bfloat16, bench_device, "G3", peers=("sdpa_flash",))
    fn = case.run if impl == "helix" else case.peers[0][1]
    benchmark.extra_info.update(shape=case.shape, bytes_moved=case.bytes_moved)
    out = benchmark(synchronized(fn))
    assert out[0].shape[-1] == 128
