"""Timing and bandwidth measurement shared by the roofline runner and pytest-benchmark files.

On a GPU: CUDA events around each call, a warm-up first, the L2 flushed (a write larger
than L2) before every timed call so that no input is served from cache, median of the
samples. On the CPU: wall clock around each call, median.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


class Timer:
    def __init__(self, device: str, warmup: int, repeats: int):
        self.device = device
        self.warmup = warmup
        self.repeats = repeats
        self._flush = None
        if device == "cuda":
            l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
            self._flush = torch.empty(max(2 * l2_bytes, 128 << 20), dtype=torch.uint8, device="cuda")

    def median_us(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        if self.device != "cuda":
            samples = []
            for _ in range(self.repeats):
                start = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - start) * 1e6)
            return statistics.median(samples)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        for start, end in zip(starts, ends):
            self._flush.zero_()  # evict the inputs from L2: every timed call reads HBM
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))


def copy_bandwidth_gbs(device: str, timer: Timer) -> float:
    """Device copy bandwidth: a large tensor copy, counting bytes read plus bytes written."""
    size = (1 << 30) if device == "cuda" else (256 << 20)
    source = torch.empty(size, dtype=torch.uint8, device=device).random_()
    destination = torch.empty_like(source)
    micros = timer.median_us(lambda: destination.copy_(source))
    return 2 * size / micros / 1e3
