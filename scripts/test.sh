#!/usr/bin/env bash
# The README's test command: set up (idempotent), build, run the whole test suite: first every
# test but the emulated CUDA ones, then those (marker `simt`) under ASan/UBSan (scripts/test_simt.sh).
# Extra arguments go to pytest in both runs, e.g. scripts/test.sh -k merge_states
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
set +e
"${HELIX_VENV:-.venv}/bin/python" -m pytest tests -m "not simt" "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure, not a pass" >&2
  exit 1
fi
set +e
scripts/test_simt.sh "$@"
simt_status=$?
set -e
if [ "$status" -ne 0 ]; then exit "$status"; fi
exit "$simt_status"
