#!/usr/bin/env bash
# Configures and builds the CMake target (the same _C library as setup.py), then loads it
# in a fresh interpreter and runs an op through it. Needs scripts/setup_env.sh first.
# TORCH_CUDA_ARCH_LIST narrows the targets as for setup.py.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${HELIX_VENV:-.venv}
py="$PWD/$venv/bin/python"
export PATH="$PWD/$venv/bin:$PATH"  # ninja from the environment
start=$(date +%s)
cmake -S . -B build/cmake -G Ninja -DPython3_EXECUTABLE="$py" > build/cmake-configure.log 2>&1 \
  || { tail -n 60 build/cmake-configure.log; exit 1; }
grep "helix-ext:" build/cmake-configure.log || true
cmake --build build/cmake > build/cmake-build.log 2>&1 || { tail -n 60 build/cmake-build.log; exit 1; }
"$py" - <<'PY'
import glob, importlib.util, torch
path = glob.glob("build/cmake/_C*.so")[0]
spec = importlib.util.spec_from_file_location("_C", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
info = module.build_info()
assert info["build_system"] == "cmake", info
assert torch._C._dispatch_has_kernel_for_dispatch_key("helix::merge_states", "CPU")
out, lse = torch.ops.helix.merge_states(torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4))
assert out.shape == (3, 4, 8) and lse.shape == (3, 4)
if info["with_cuda"]:
    assert torch._C._dispatch_has_kernel_for_dispatch_key("helix::merge_states", "CUDA")
print(f"cmake_check: {path} loads and runs; build_info {info}")
PY
echo "cmake_check: configure + build took $(( $(date +%s) - start )) s"
