"""Finding the CUDA toolkit and the target archs for helix-ext's builds (setup.py and CMake).

Torch guesses CUDA_HOME as the parent of whatever `nvcc` is on PATH; where that nvcc is a
wrapper script living outside the toolkit (as on helix-ext's build machines) the guess has
no libcudart and linking fails. This module resolves the real toolkit instead:
CUDA_HOME / CUDA_PATH if set, else the toolkit the nvcc on PATH really belongs to (asked of
nvcc itself), else /usr/local/cuda. No torch import here: CMake runs this file as a script.

  python tools/cuda_toolkit.py --home      print the toolkit root (exit 1 if none)
  python tools/cuda_toolkit.py --archs     print the CMake CUDA_ARCHITECTURES list
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

DEFAULT_CUDA_ARCHS = "9.0a;10.0a"


def is_toolkit(path: str | None) -> bool:
    """A CUDA toolkit root has bin/nvcc, the runtime headers and libcudart."""
    if not path or not os.path.isfile(os.path.join(path, "bin", "nvcc")):
        return False
    include_dirs = [os.path.join(path, "include")] + glob.glob(os.path.join(path, "targets", "*", "include"))
    lib_dirs = [os.path.join(path, d) for d in ("lib64", "lib")] + glob.glob(os.path.join(path, "targets", "*", "lib"))
    has_header = any(os.path.isfile(os.path.join(d, "cuda_runtime_api.h")) for d in include_dirs)
    has_cudart = any(glob.glob(os.path.join(d, "libcudart.so*")) for d in lib_dirs)
    return has_header and has_cudart


def toolkit_of_nvcc(nvcc: str) -> str | None:
    """The toolkit an nvcc really belongs to, even when `nvcc` is a wrapper script elsewhere."""
    candidate = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if is_toolkit(candidate):
        return candidate
    # Ask nvcc itself: a dry run prints the toolkit root as "#$ TOP=<root>/bin/..".
    try:
        dry_run = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", dry_run.stdout + dry_run.stderr, re.MULTILINE)
    if match:
        candidate = os.path.normpath(match.group(1).strip().strip('"'))
        if is_toolkit(candidate):
            return candidate
    return None


def find_cuda_toolkit() -> tuple[str | None, str]:
    """(toolkit root or None, how it was found or why none was)."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(variable)
        if value:
            if is_toolkit(value):
                return os.path.normpath(value), f"{variable}={value}"
            return None, f"{variable}={value} is not a CUDA toolkit (no bin/nvcc, cuda_runtime_api.h or libcudart)"
    nvcc = shutil.which("nvcc")
    if nvcc:
        toolkit = toolkit_of_nvcc(nvcc)
        if toolkit:
            return toolkit, f"the toolkit of {nvcc}"
    if is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda", "the default location"
    return None, "no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)"


def nvcc_version(toolkit: str) -> tuple[int, int] | None:
    try:
        text = subprocess.run([os.path.join(toolkit, "bin", "nvcc"), "--version"],
                              capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def parse_arch_list(text: str | None) -> list[tuple[str, bool]]:
    """'9.0a;10.0a+PTX' -> [('90a', False), ('100a', True)]; ';', ',' or spaces separate.

    None or empty text gives the defaults (sm_90a and sm_100a: Hopper and Blackwell)."""
    text = text if text and text.strip() else DEFAULT_CUDA_ARCHS
    archs = []
    for item in re.split(r"[;,\s]+", text.strip()):
        if not item:
            continue
        match = re.fullmatch(r"(?:sm_)?(\d+)\.?(\d)([af]?)(\+PTX)?", item, re.IGNORECASE)
        if not match:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST entry {item!r} is not like '9.0a' or '10.0a+PTX'")
        archs.append((f"{match.group(1)}{match.group(2)}{match.group(3).lower()}", bool(match.group(4))))
    return archs


def gencode_flags(archs: list[tuple[str, bool]]) -> list[str]:
    flags = []
    for arch, ptx in archs:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


def main(argv: list[str]) -> int:
    if argv == ["--home"]:
        toolkit, how = find_cuda_toolkit()
        if toolkit is None:
            print(how, file=sys.stderr)
            return 1
        print(toolkit)
        return 0
    if argv == ["--archs"]:
        # CMake spells sm_90a as 90a and PTX as 90a-virtual.
        archs = parse_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"))
        items = []
        for arch, ptx in archs:
            items.append(f"{arch}-real" if ptx else arch)
            if ptx:
                items.append(f"{arch}-virtual")
        print(";".join(items))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
