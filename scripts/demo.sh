#!/usr/bin/env bash
# The README's main-job command: set up (idempotent), build, run the demo.
# Extra arguments go to the demo, e.g. scripts/demo.sh --prompt "What is the capital of France?" --kvp 4 --tpa 1
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
exec "${HELIX_VENV:-.venv}/bin/python" -m helix_ext demo "$@"
