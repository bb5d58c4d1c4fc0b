"""pytest-benchmark timings of the FP4 ops: the grouped GEMM at F4 (E=32, N=4096, K=7168, one
token per expert; the CPU runs a small shape) against torch._grouped_mm on bf16 weights, and
quantize_fp4 (MXFP4). Roofline numbers for every headline shape come from `python -m bench`."""

import pytest

from bench.cases import fp4_grouped_gemm_case, quantize_fp4_case


@pytest.mark.parametrize("impl", ["helix", "torch_grouped_mm_bf16"])
def test_fp4_grouped_gemm(benchmark, bench_device, synchronized, impl):
    if bench_device == "cuda":
        case = fp4_grouped_gemm_case("F4", 32, 4096, 7168, 1, "nvfp4", bench_device)
    else:
        case = fp4_grouped_gemm_case("small", 4, 256, 512, 2, "nvfp4", bench_device)
    fn = case.run if impl == "helix" else case.peers[0][1]
    benchmark.extra_info.update(shape=case.shape, bytes_moved=case.bytes_moved)
    y = benchmark(synchronized(fn))
    assert y.dim() == 2


def test_quantize_fp4(benchmark, bench_device, synchronized):
    rows, cols = (4096, 7168) if bench_device == "cuda" else (256, 1024)
    case = quantize_fp4_case("Q1", rows, cols, "mxfp4", False, bench_device)
    benchmark.extra_info.update(shape=case.shape, bytes_moved=case.bytes_moved)
    packed, _, _ = benchmark(synchronized(case.run))
    assert packed.shape == (rows, cols // 2)
