#!/usr/bin/env bash
# The emulated CUDA tests (pytest marker `simt`): the CUDA kernels' own source run on the CPU by
# the SIMT host runtime (helix_ext._simt), under AddressSanitizer and UBSan, whose runtime must
# be the first library of the process (LD_PRELOAD). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${HELIX_VENV:-.venv}/bin/python"
eval "$("$py" tools/simt_build.py --env)"
start=$(date +%s)
set +e
"$py" -m pytest -m simt "$@"  # testpaths (tests/) unless paths are given
status=$?
set -e
echo "test_simt.sh: the emulated CUDA tests took $(( $(date +%s) - start )) s"
if [ "$status" -eq 5 ]; then
  echo "test_simt.sh: pytest collected no emulated test; that is a failure, not a pass" >&2
  exit 1
fi
exit "$status"
