"""The SIMT host runtime from Python: the CUDA kernels' own source, run on CPU tensors.

``helix_ext._simt`` (csrc/simt) compiles the kernels of csrc/include/helix with the host C++
compiler, AddressSanitizer and UBSan, and registers ``torch.ops.helix_simt.*`` with the schemas
of ``torch.ops.helix.*``: the same launchers plan the grids and splits, the threads of each CTA
run as fibers with PTX semantics for cp.async, ldmatrix and mma.sync. The ASan runtime must be
loaded first in the process: ``scripts/test_simt.sh`` (or ``tools/simt_build.py --env``) sets
``LD_PRELOAD``; elsewhere :func:`unavailable_reason` says why the module cannot load.

    with helix_ext.simt.settings(schedule="reversed", seed=3):
        out, lse = torch.ops.helix_simt.flash_decode(...)

    out, lse = helix_ext.simt.run_all_schedules(torch.ops.helix_simt.merge_states, parts_out, parts_lse)
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Callable, Iterator

import torch

SCHEDULES = {"in_order": 0, "reversed": 1, "round_robin": 2, "shuffle": 3}
# The schedules every emulated test runs under; outputs must be bitwise identical across them
# (with a different poison byte each, so a read of memory nobody wrote changes the result).
DEFAULT_SCHEDULES = (("in_order", 0, 0xFF), ("reversed", 0, 0x7F), ("round_robin", 0, 0xFF), ("shuffle", 1, 0xA5))

_module = None
_error: str | None = None


def _asan_preloaded() -> bool:
    # Importing an ASan-built library into a process whose ASan runtime was not loaded first
    # aborts the process (not an ImportError): look before importing.
    try:
        with open("/proc/self/maps") as maps:
            return any("libasan" in line for line in maps)
    except OSError:
        return False


def _load():
    global _module, _error
    if _module is None and _error is None:
        if not _asan_preloaded():
            _error = ("helix_ext._simt is built with AddressSanitizer, whose runtime is not loaded in this process; "
                      "run the emulated tests with scripts/test_simt.sh (it sets LD_PRELOAD)")
            return None
        try:
            _module = importlib.import_module("helix_ext._simt")
        except ImportError as error:  # not built, or the ASan runtime is not preloaded
            _error = f"helix_ext._simt cannot be imported ({error}); run the emulated tests with scripts/test_simt.sh"
    return _module


def unavailable_reason() -> str | None:
    """None where torch.ops.helix_simt is usable in this process, else why not."""
    _load()
    return _error


def module():
    mod = _load()
    if mod is None:
        raise RuntimeError(_error)
    return mod


def planted_defects() -> dict[str, int]:
    """Names and ids of the defects planted in the kernels (switched on by settings(planted_defect=...))."""
    return dict(module().planted_defects)


@contextlib.contextmanager
def settings(schedule: str = "in_order", seed: int = 0, poison: int = 0xFF, multiprocessor_count: int = 132,
             planted_defect: str | int = 0) -> Iterator[None]:
    """Emulation settings for the calls made inside the block (this OS thread)."""
    mod = module()
    previous = mod.get_settings()
    defect = planted_defects()[planted_defect] if isinstance(planted_defect, str) else planted_defect
    mod.set_settings(SCHEDULES[schedule], seed, poison, multiprocessor_count, defect)
    try:
        yield
    finally:
        mod.set_settings(previous["schedule"], previous["seed"], previous["poison"], previous["multiprocessor_count"],
                         previous["planted_defect"])


def _flatten(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _flatten(item)]
    return []


def _clone_arguments(args: tuple) -> tuple:
    # Ops that write their arguments (hopb_signal) get fresh copies per schedule.
    return tuple(a.clone() if isinstance(a, torch.Tensor) else
                 [t.clone() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) else a
                 for a in args)


def run_all_schedules(op: Callable, *args, schedules=DEFAULT_SCHEDULES, multiprocessor_count: int = 132,
                      planted_defect: str | int = 0, mutates: bool = False, **kwargs):
    """Runs op under every schedule and returns the first result, after checking that all the
    results are bitwise identical (a difference is a race, a missing barrier or a read of
    memory nothing wrote)."""
    results = []
    for schedule, seed, poison in schedules:
        call_args = _clone_arguments(args) if mutates else args
        with settings(schedule, seed, poison, multiprocessor_count, planted_defect):
            result = op(*call_args, **kwargs)
        results.append((schedule, _flatten(result) + (_flatten(call_args) if mutates else []), result))
    first_name, first, first_result = results[0]
    for name, tensors, _ in results[1:]:
        for index, (a, b) in enumerate(zip(first, tensors)):
            same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(
                a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
            if not same:
                raise AssertionError(f"output {index} differs between schedules {first_name!r} and {name!r}: the "
                                     "kernel's result depends on thread order or on memory nothing wrote")
    return first_result


_load()  # registers torch.ops.helix_simt where the module can be loaded
