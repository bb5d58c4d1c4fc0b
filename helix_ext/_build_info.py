"""What this installation of helix-ext was built with, and which kernels each op has."""

from __future__ import annotations

import torch

from helix_ext import _C

_NAMESPACE = "helix"


def op_names() -> list[str]:
    """Names of all torch.ops.helix operators registered by the native library."""
    prefix = f"{_NAMESPACE}::"
    names = {name[len(prefix):].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
             if name.startswith(prefix)}
    return sorted(names)


def _has_kernel(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{_NAMESPACE}::{op}", dispatch_key)


def build_info() -> dict:
    """The build of helix_ext._C.

    Keys: ``torch_version`` and ``cuda_version`` (built against; ``cuda_version`` is None in a
    CPU-only build), ``with_cuda``, ``cuda_archs`` (e.g. ``["sm_90a", "sm_100a"]``),
    ``cuda_skip_reason`` (why CUDA kernels were not built, else None), ``build_system``,
    ``torch_runtime_version`` (the torch imported now), and ``ops``: for each operator,
    whether a ``cpu`` and a ``cuda`` kernel is registered.
    """
    info = dict(_C.build_info())
    info["torch_runtime_version"] = torch.__version__
    info["ops"] = {op: {"cpu": _has_kernel(op, "CPU"), "cuda": _has_kernel(op, "CUDA")} for op in op_names()}
    return info


CUDA_BUILT: bool = bool(_C.build_info()["with_cuda"])
CUDA_SKIP_REASON: str | None = _C.build_info()["cuda_skip_reason"]
