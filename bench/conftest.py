"""pytest-benchmark setup: run with `python -m pytest bench` (GPU when present, else CPU)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import helix_ext  # noqa: E402


@pytest.fixture(scope="session")
def bench_device() -> str:
    return "cuda" if torch.cuda.is_available() and helix_ext.build_info()["with_cuda"] else "cpu"


@pytest.fixture
def synchronized(bench_device):
    """Wraps a call so that pytest-benchmark's wall clock covers the device work too."""
    def wrap(fn):
        if bench_device != "cuda":
            return fn

        def call():
            result = fn()
            torch.cuda.synchronize()
            return result
        return call
    return wrap
