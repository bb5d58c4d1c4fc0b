#!/usr/bin/env bash
# The README's test command: set up (idempotent), build, run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k merge_states
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
set +e
"${HELIX_VENV:-.venv}/bin/python" -m pytest tests "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure, not a pass" >&2
  exit 1
fi
exit "$status"
