"""Shared pytest setup: the `gpu` marker skips, with the reason, where no GPU or no CUDA kernel is."""

import os

import pytest
import torch

import helix_ext
from helix_ext import simt
from helix_ext._build_info import CUDA_BUILT, CUDA_SKIP_REASON

# Spawned test ranks (2 to 8 per test) run on the CPU (gloo) unless a test asks for a backend:
# a machine with fewer GPUs than ranks would otherwise refuse them (launch.choose_backend).
os.environ.setdefault("HELIX_RANK_DEVICE", "cpu")


def gpu_skip_reason() -> str | None:
    if not CUDA_BUILT:
        return f"helix_ext was built without CUDA kernels: {CUDA_SKIP_REASON}"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = gpu_skip_reason()
    skip_gpu = pytest.mark.skip(reason=reason) if reason else None
    simt_reason = simt.unavailable_reason() if any("simt" in item.keywords for item in items) else None
    skip_simt = pytest.mark.skip(reason=simt_reason) if simt_reason else None
    for item in items:
        if skip_gpu and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        if skip_simt and "simt" in item.keywords:
            item.add_marker(skip_simt)


def pytest_report_header(config):
    info = helix_ext.build_info()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (f"helix_ext: torch {info['torch_version']}, cuda {info['cuda_version']}, "
            f"archs {info['cuda_archs']}, gpu {gpu}")


# Run a test on the CPU and, where there is one, on the GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# ... and with the CUDA kernels' source run by the SIMT host runtime on CPU tensors
# (torch.ops.helix_simt; the `simt` marker: scripts/test_simt.sh runs these under ASan).
SIMT = pytest.param("simt", marks=pytest.mark.simt)
DEVICES_AND_SIMT = DEVICES + [SIMT]


def tensor_device(device: str) -> str:
    """Where a test's tensors live: emulated CUDA runs on CPU tensors."""
    return "cpu" if device == "simt" else device


def call_op(device: str, name: str, *args, mutates: bool = False, **kwargs):
    """helix_ext.<name> on cpu/cuda; on "simt" the emulated CUDA kernels, under every schedule
    (results must be bitwise identical across schedules)."""
    if device == "simt":
        return simt.run_all_schedules(getattr(torch.ops.helix_simt, name), *args, mutates=mutates, **kwargs)
    return getattr(helix_ext, name)(*args, **kwargs)
