"""The build: toolkit discovery, arch parsing, and what build_info() reports."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
import torch

import helix_ext
from helix_ext._build_info import op_names

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import cuda_toolkit  # noqa: E402


def test_build_info_shape():
    info = helix_ext.build_info()
    for key in ("torch_version", "cuda_version", "with_cuda", "cuda_archs", "cuda_skip_reason", "ops"):
        assert key in info, key
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert "merge_states" in info["ops"]
    for op, kernels in info["ops"].items():
        assert kernels["cpu"], f"{op} has no CPU kernel"
        assert kernels["cuda"] == info["with_cuda"], f"{op}: CUDA kernel registered {kernels['cuda']}"
    if info["with_cuda"]:
        assert info["cuda_skip_reason"] is None and info["cuda_archs"]
    else:
        assert info["cuda_skip_reason"] and info["cuda_version"] is None


def test_every_op_has_a_python_wrapper():
    from helix_ext.ops import INTERNAL_OPS

    for op in op_names():
        if op in INTERNAL_OPS:  # driven by helix_ext.parallel.FusedExchange, not public API
            assert not hasattr(helix_ext, op)
            continue
        wrapper = getattr(helix_ext, op)
        assert wrapper.__doc__, f"helix_ext.{op} has no docstring"


@pytest.mark.skipif(os.environ.get("HELIX_REQUIRE_CUDA", "0") in ("", "0"),
                    reason="HELIX_REQUIRE_CUDA is not set (CI sets it: there the CUDA kernels must be built)")
def test_ci_build_has_cuda_kernels_for_hopper_and_blackwell():
    info = helix_ext.build_info()
    assert info["with_cuda"], info["cuda_skip_reason"]
    assert {"sm_90a", "sm_100a"} <= set(info["cuda_archs"]), info["cuda_archs"]
    assert all(kernels["cuda"] for kernels in info["ops"].values()), info["ops"]


def make_fake_toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "lib64").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\necho fake\n")
    (root / "include" / "cuda_runtime_api.h").write_text("")
    (root / "lib64" / "libcudart.so").write_text("")
    return root


def write_wrapper(path: Path, toolkit: Path) -> Path:
    # Like the machine's own: a script outside the toolkit that answers a dry run with TOP=.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\necho "#$ TOP={toolkit}/bin/.." >&2\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_toolkit_found_through_a_wrapper_nvcc(tmp_path, monkeypatch):
    toolkit = make_fake_toolkit(tmp_path / "cuda-13.0")
    wrapper = write_wrapper(tmp_path / "wrappers" / "bin" / "nvcc", toolkit)
    assert not cuda_toolkit.is_toolkit(str(wrapper.parent.parent))  # torch's guess would fail here
    assert cuda_toolkit.toolkit_of_nvcc(str(wrapper)) == str(toolkit)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper.parent))
    found, how = cuda_toolkit.find_cuda_toolkit()
    assert found == str(toolkit), how


def test_cuda_home_wins_and_is_validated(tmp_path, monkeypatch):
    toolkit = make_fake_toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert cuda_toolkit.find_cuda_toolkit()[0] == str(toolkit)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    found, why = cuda_toolkit.find_cuda_toolkit()
    assert found is None and "is not a CUDA toolkit" in why


def test_arch_list_parsing():
    assert cuda_toolkit.parse_arch_list(None) == [("90a", False), ("100a", False)]
    assert cuda_toolkit.parse_arch_list("9.0a") == [("90a", False)]
    assert cuda_toolkit.parse_arch_list("9.0;10.0a+PTX") == [("90", False), ("100a", True)]
    assert cuda_toolkit.gencode_flags([("100a", True)]) == [
        "-gencode=arch=compute_100a,code=sm_100a", "-gencode=arch=compute_100a,code=compute_100a"]
    with pytest.raises(ValueError, match="not like"):
        cuda_toolkit.parse_arch_list("hopper")
