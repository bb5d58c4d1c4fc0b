"""How helix_ext._simt is built: the SIMT host runtime (csrc/simt) and the CUDA kernels'
source compiled by the host C++ compiler with AddressSanitizer and UBSan.

setup.py builds it next to helix_ext._C. Loading it needs the ASan runtime first in the
process (LD_PRELOAD=<libasan.so>), which scripts/test_simt.sh sets up; see simt_environment().
No torch import here.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]


def sources() -> list[str]:
    folder = ROOT / "csrc" / "simt"
    return [str(p.relative_to(ROOT)) for p in sorted(folder.glob("*.cpp"))]


def include_dirs(cuda_include: str) -> list[str]:
    return [str(ROOT / "csrc"), str(ROOT / "csrc" / "include"), str(ROOT / "csrc" / "simt" / "include"), cuda_include]


def compile_flags() -> list[str]:
    # -O2: the emulated suite's time is mostly the runtime's collectives. The planted-defect hooks
    # are compiled in (runtime switches, off unless a test turns one on).
    # -fno-wrapv undoes Python's -fwrapv (from its build flags), under which signed overflow is
    # defined and UBSan would never report it.
    return ["-O2", "-g1", "-std=c++20", "-fno-wrapv", "-DHELIX_SIMT", "-DHELIX_PLANTED_DEFECTS", *SANITIZERS]


def link_flags() -> list[str]:
    # -Bsymbolic: our cudaGetLastError & co. answer our own calls, not torch's libcudart's.
    return [*SANITIZERS, "-Wl,-Bsymbolic"]


def compiler_library(name: str) -> str | None:
    """A runtime library of the compiler that built the extension (for LD_PRELOAD)."""
    compiler = os.environ.get("CXX", "c++")
    try:
        path = subprocess.run([compiler, f"-print-file-name={name}"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return os.path.realpath(path) if os.path.isabs(path) and os.path.exists(path) else None


def asan_runtime() -> str | None:
    return compiler_library("libasan.so")


def simt_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment in which a Python process can import helix_ext._simt."""
    env = dict(os.environ if base is None else base)
    runtime = asan_runtime()
    if runtime is None:
        raise RuntimeError("no ASan runtime found (c++ -print-file-name=libasan.so)")
    # libstdc++ right after it: ASan's exception interceptor must find the real __cxa_throw, and
    # python itself does not load libstdc++ before ASan initializes.
    wanted = [runtime] + [lib for lib in [compiler_library("libstdc++.so.6")] if lib]
    preload = [entry for entry in env.get("LD_PRELOAD", "").split(":") if entry and entry not in wanted]
    env["LD_PRELOAD"] = ":".join(wanted + preload)
    # Python and torch allocate for the life of the process: leaks are not findings here.
    env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=0:halt_on_error=1")
    env["UBSAN_OPTIONS"] = env.get("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    return env


if __name__ == "__main__":
    import shlex
    import sys

    if sys.argv[1:] == ["--env"]:
        env = simt_environment({})
        for key in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS"):
            print(f"export {key}={shlex.quote(env[key])}")
    else:
        print(__doc__)
