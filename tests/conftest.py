"""Shared pytest setup: the `gpu` marker skips, with the reason, where no GPU or no CUDA kernel is."""

import pytest
import torch

import helix_ext
from helix_ext._build_info import CUDA_BUILT, CUDA_SKIP_REASON


def gpu_skip_reason() -> str | None:
    if not CUDA_BUILT:
        return f"helix_ext was built without CUDA kernels: {CUDA_SKIP_REASON}"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = gpu_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    info = helix_ext.build_info()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (f"helix_ext: torch {info['torch_version']}, cuda {info['cuda_version']}, "
            f"archs {info['cuda_archs']}, gpu {gpu}")


# Run a test on the CPU and, where there is one, on the GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
