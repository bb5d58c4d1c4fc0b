"""bench/KERNELS.md: napkin math, resources and a SASS read of every CUDA kernel, no GPU needed.

    python -m bench.kernels_report            # rewrite bench/KERNELS.md
    python -m bench.kernels_report --check    # fail if bench/KERNELS.md is not current (CI)

For each kernel and standard shape: the bytes that must move and the flops, the time floor at
the H200's measured 4.3 TB/s copy bandwidth and ~790 TFLOP/s bf16, the launch configuration
(from the library's own constexprs via helix_ext._C.kernel_launch_info and the launchers'
planning rules), and a predicted time. Then the compiler's resource table (registers, stack,
shared memory, local memory) for sm_90a and sm_100a and what the SASS shows (load widths,
tensor-core instructions, local memory), read with cuobjdump from the built library (the
toolkit's, or the one that ships inside the triton package), with a one-line verdict.
Measured times, where a GPU benchmark JSON in bench/results/ has them, sit beside the
predictions.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

import helix_ext
from bench.cases import EXTRA, QUICK_EXTRA, STANDARD
from bench.traffic import (ceil_div, flash_decode_traffic, fp4_grouped_gemm_traffic, hopb_combine_traffic,
                           merge_states_traffic, quantize_fp4_traffic)

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "bench" / "KERNELS.md"

# The H200 as measured on this project's device machine (KINDS.md: 4.3 TB/s device copy,
# 769-798 TFLOP/s bf16 8192^3 matmul), and its public shape.
COPY_BANDWIDTH = 4.3e12
BF16_TENSOR_FLOPS = 790e12
SMS = 132
SM_REGISTERS = 65536
SM_SHARED = 228 * 1024
SM_THREADS = 2048
SM_BLOCKS = 32
# Prediction assumptions (stated once; checked against measurements when they exist):
MEMORY_EFFICIENCY = 0.9        # a well-fed streaming kernel reaches ~90% of copy bandwidth
PER_SM_BANDWIDTH = 2 * COPY_BANDWIDTH / SMS  # an SM alone can draw about twice its fair share
MMA_SYNC_EFFICIENCY = 0.6      # mma.sync (not wgmma) reaches ~60% of the bf16 matmul rate
LAUNCH_US = 3.0                # launch + tail per kernel launch


# --------------------------------------------------------------------------- binary reading
def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        candidate = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if candidate.exists():
            return str(candidate)
    raise SystemExit("kernels_report: no cuobjdump (install the CUDA toolkit's, or triton, which ships one)")


def library() -> str:
    return helix_ext._C.__file__


def demangle(names: list[str]) -> dict[str, str]:
    if not names or not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


def short_name(demangled: str) -> str:
    name = demangled.replace("helix::", "").replace("(anonymous namespace)::", "")
    name = re.sub(r"\(.*\)$", "", name)  # drop the parameter list
    name = re.sub(r"^void ", "", name)  # template kernels demangle with their return type
    for long, short in (("__nv_bfloat16", "bf16"), ("__half", "fp16"), ("FlashDecodeConfig", "Cfg"),
                        ("unsigned char", "u8")):
        name = name.replace(long, short)
    return name.replace(" ", "")


def resource_usage(binary: str) -> dict[tuple[str, str], dict[str, int]]:
    """{(arch, mangled name): {REG, STACK, SHARED, LOCAL}} from cuobjdump --dump-resource-usage."""
    text = subprocess.run([cuobjdump(), "--dump-resource-usage", binary], capture_output=True, text=True).stdout
    usage, arch = {}, None
    for line in text.splitlines():
        if line.startswith("arch = "):
            arch = line.split("=")[1].strip()
        match = re.match(r"\s*Function (\S+):", line)
        if match:
            current = match.group(1)
        fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line))
        if fields and "REG" in fields:
            usage[(arch, current)] = {k: int(v) for k, v in fields.items()}
    return usage


INSTRUCTION_CLASSES = {
    "LDG.128": r"LDG\.E[.A-Z]*\.128", "LDG.64": r"LDG\.E[.A-Z]*\.64", "LDG.32-": r"LDG\.E(?![.A-Z]*\.(?:128|64)\b)",
    "LDGSTS.128": r"LDGSTS[.A-Z]*\.128", "LDSM": r"LDSM", "HMMA": r"HMMA", "HMUL2": r"HMUL2", "MUFU": r"MUFU",
    "STG.128": r"STG\.E[.A-Z]*\.128", "LDL": r"\bLDL\b", "STL": r"\bSTL\b",
}


def sass_histograms(binary: str, arch: str) -> dict[str, Counter]:
    """{mangled name: Counter of instruction classes} for one arch."""
    text = subprocess.run([cuobjdump(), "--dump-sass", "-arch", arch, binary], capture_output=True, text=True).stdout
    histograms, current = {}, None
    for line in text.splitlines():
        match = re.match(r"\s*Function : (\S+)", line)
        if match:
            current = match.group(1)
            histograms[current] = Counter()
            continue
        if current is None or "/*" not in line:
            continue
        instruction = line.split("*/", 1)[-1].split(";")[0].strip()
        for name, pattern in INSTRUCTION_CLASSES.items():
            if re.search(pattern, instruction):
                histograms[current][name] += 1
    return histograms


# --------------------------------------------------------------------------- occupancy + planning
def occupancy(registers: int, threads: int, shared: int) -> int:
    warps = ceil_div(threads, 32)
    registers_per_warp = ceil_div(max(registers, 1) * 32, 256) * 256
    by_registers = SM_REGISTERS // (registers_per_warp * warps)
    by_shared = SM_SHARED // (shared + 1024) if shared else SM_BLOCKS
    return max(0, min(by_registers, by_shared, SM_THREADS // threads, SM_BLOCKS))


def predicted_us(bytes_moved: int, flops: int, grid: int, launches: int, tensor_cores: bool) -> float:
    bandwidth = min(MEMORY_EFFICIENCY * COPY_BANDWIDTH, min(grid, SMS) * PER_SM_BANDWIDTH)
    compute = flops / (MMA_SYNC_EFFICIENCY * BF16_TENSOR_FLOPS) if tensor_cores else 0.0
    return max(bytes_moved / bandwidth, compute) * 1e6 + launches * LAUNCH_US


def floor_us(bytes_moved: int, flops: int) -> float:
    return max(bytes_moved / COPY_BANDWIDTH, flops / BF16_TENSOR_FLOPS) * 1e6


# --------------------------------------------------------------------------- per-family rows
def find_registers(usage, pattern: str, arch: str = "sm_90a") -> int:
    for (a, name), fields in usage.items():
        if a == arch and re.search(pattern, name):
            return fields["REG"]
    return 0


def shapes(op: str) -> list[dict]:
    seen, result = set(), []
    for shape in [STANDARD[op]] + QUICK_EXTRA.get(op, []) + EXTRA.get(op, []):
        key = tuple(sorted((k, str(v)) for k, v in shape.items()))
        if key not in seen:
            seen.add(key)
            result.append(shape)
    return result


# --------------------------------------------------------------------------- issued tensor work
MMA_FLOPS = 2 * 16 * 8 * 16  # one mma.sync m16n8k16 (one HMMA.16816 in the SASS)


def flash_decode_template(short: str) -> dict | None:
    """The template parameters of a flash_decode instance, from its name
    (flash_decode_kernel<Cfg<DK,DV,WARPS_M,WARPS_V,WARPS_T,TILE,STAGES,SHARED_KV>,T,FP8>)."""
    match = re.match(r"flash_decode_kernel<Cfg<(\d+),(\d+),(\d+),(\d+),(\d+),(\d+),(\d+),(true|false)>,(\w+),"
                     r"(true|false)>", short)
    if not match:
        return None
    dk, dv, wm, wv, wt, tile, stages = (int(x) for x in match.groups()[:7])
    return dict(dk=dk, dv=dv, warps_m=wm, warps_v=wv, warps_t=wt, tile=tile, stages=stages,
                shared_kv=match.group(8) == "true", dtype=match.group(9), fp8=match.group(10) == "true")


def flash_decode_mmas_per_warp_tile(c: dict) -> int:
    """The m16n8k16 MMAs one warp issues per pipeline tile, from the configuration: each warp
    scores its 16 heads against its TILE / WARPS_T tokens over DK / WARPS_V of the reduction
    (the WARPS_V warps that share those heads and tokens split it and add their partial
    scores), then multiplies P by its DV / WARPS_V slice of V."""
    tokens, dv = c["tile"] // c["warps_t"], c["dv"] // c["warps_v"]
    return (tokens // 8) * (c["dk"] // 16 // c["warps_v"]) + (dv // 8) * (tokens // 16)


def flash_decode_issued_flops(c: dict, batch: int, num_q_heads: int, num_kv_heads: int, seq_len: int) -> int:
    """Tensor FLOPs the kernel issues for a shape: every CTA runs warps_m x warps_v x warps_t
    warps over ceil(L / TILE) tiles (splits are whole tiles) for a head tile of 16 x warps_m
    rows, padded when the query group is smaller."""
    head_tiles = ceil_div(num_q_heads // num_kv_heads, 16 * c["warps_m"])
    warps = c["warps_m"] * c["warps_v"] * c["warps_t"]
    ctas = batch * num_kv_heads * head_tiles
    return ctas * ceil_div(seq_len, c["tile"]) * warps * flash_decode_mmas_per_warp_tile(c) * MMA_FLOPS


def flash_decode_instances(sass: dict[str, Counter]) -> dict[str, tuple[dict, int]]:
    """{short name: (template parameters, HMMA count in the sm_90a SASS)} of every flash_decode
    instance built."""
    found = {}
    for name, histogram in sass.items():
        template = flash_decode_template(name)
        if template is not None:
            found[name] = (template, histogram["HMMA"])
    return found


def merge_states_rows(info, usage, sass):
    threads = info["merge_states"]["threads"]
    rows = []
    for s in shapes("merge_states"):
        t = merge_states_traffic(**s)
        vec = 16 // torch.empty((), dtype=s["dtype"]).element_size()
        grid = min(ceil_div(s["batch"] * s["heads"] * s["head_dim"] // vec, threads), SMS * 64)
        rows.append(("merge_states", t, f"grid {grid} x {threads} thr, 0 smem", 1, grid, False))
    return rows


def flash_decode_rows(info, usage, sass):
    configs = {c["name"]: c for c in info["flash_decode"]}
    templates = {(t["dk"], t["dv"]): t for t, _ in flash_decode_instances(sass).values()}
    rows = []
    for s in shapes("flash_decode"):
        s = {k: v for k, v in s.items() if k != "peers"}
        t = flash_decode_traffic(**s)
        mla = s["head_dim_k"] != s["head_dim_v"]
        name = "mla" if mla else f"d{s['head_dim_k']}"
        config, fp8 = configs[name], s["kv_dtype"] == torch.float8_e4m3fn
        smem = config["dynamic_smem_fp8" if fp8 else "dynamic_smem"]
        dims = "576ELi512" if mla else f"{s['head_dim_k']}ELi{s['head_dim_k']}"
        registers = find_registers(usage, rf"flash_decode_kernel.*ILi{dims}E.*13__nv_bfloat16Lb{int(fp8)}E")
        ctas_per_sm = occupancy(registers, config["threads"], smem)
        group = s["num_q_heads"] // s["num_kv_heads"]
        head_tiles = ceil_div(group, config["heads_per_cta"])
        ctas = s["batch"] * s["num_kv_heads"] * head_tiles
        # Mirrors flash_decode.cu plan_splits: one wave of CTAs, at most one split per tile.
        block = s["block_size"] or s["seq_len"]
        capacity = ceil_div(s["seq_len"], block) * block
        max_splits = max(1, min(256, ceil_div(capacity, config["tile_tokens"])))
        splits = min(max(1, ceil_div(SMS * max(ctas_per_sm, 1), ctas)), max_splits)
        grid = ctas * splits
        launch = (f"{name}: grid {grid} ({splits} splits x {ctas}) x {config['threads']} thr, "
                  f"{smem // 1024} KB smem, {ctas_per_sm} CTA/SM")
        issued = flash_decode_issued_flops(templates[(s["head_dim_k"], s["head_dim_v"])], s["batch"],
                                           s["num_q_heads"], s["num_kv_heads"], s["seq_len"])
        rows.append(("flash_decode", t, launch, 1 + (splits > 1), grid, True, issued))
    return rows


def fp4_gemm_rows(info, usage, sass):
    g = info["fp4_grouped_gemm"]
    rows = []
    for s in shapes("fp4_grouped_gemm"):
        t = fp4_grouped_gemm_traffic(**s)
        tokens = s["num_experts"] * s["tokens_per_expert"]
        single = tokens <= 16
        smem = g["dynamic_smem_m1" if single else "dynamic_smem_m4"]
        registers = find_registers(usage, rf"fp4_grouped_gemm_kernelILi{1 if single else 4}E")
        ctas_per_sm = occupancy(registers, g["threads"], smem)
        n_tiles = ceil_div(s["n"], g["tile_n"])
        units = s["num_experts"] * n_tiles
        chunks = ceil_div(s["k"], g["chunk_k"])
        # Mirrors fp4_grouped_gemm.cu: split K only at decode sizes when the units underfill a wave.
        target = SMS * max(2, ctas_per_sm)
        splits = 1 if units >= target or tokens > 64 else min(ceil_div(target, units), 32)
        splits = max(1, min(splits, chunks))
        splits = ceil_div(chunks, ceil_div(chunks, splits))
        grid = units * splits
        launch = (f"M_TILES={1 if single else 4}: grid {grid} ({n_tiles} n-tiles x {s['num_experts']} experts x "
                  f"{splits} k-splits) x {g['threads']} thr, {smem // 1024} KB smem, {ctas_per_sm} CTA/SM")
        rows.append(("fp4_grouped_gemm", t, launch, 1 + (splits > 1), grid, True))
    return rows


def quantize_rows(info, usage, sass):
    threads = info["fp4_quantize"]["threads"]
    rows = []
    for s in shapes("quantize_fp4"):
        t = quantize_fp4_traffic(**s)
        block = 16 if s["fmt"] == "nvfp4" else 32
        grid = min(ceil_div(s["rows"] * s["cols"] // block, threads), SMS * 32)
        amax = s["fmt"] == "nvfp4" and not s["given_global"]
        # The amax pass reads x once more (an L2 hit at best when x fits in the 60 MB L2).
        extra = s["rows"] * s["cols"] * 2 if amax else 0
        t = type(t)(t.shape, t.bytes_moved + extra, 0)
        launch = f"{'amax + ' if amax else ''}quantize: grid {grid} x {threads} thr, thread per block of {block}"
        rows.append(("quantize_fp4", t, launch, 1 + amax, grid, False))
    return rows


def hopb_rows(info, usage, sass):
    threads = info["hopb_combine"]["threads"]
    rows = []
    for s in shapes("hopb_combine"):
        t = hopb_combine_traffic(**s)
        grid = min(ceil_div(s["batch"] * s["heads"] * s["head_dim"] // 8, threads), SMS * 8)
        rows.append(("hopb_combine", t, f"grid {grid} x {threads} thr (flags waited by thread 0 of each CTA)", 1,
                     grid, False))
    return rows


# --------------------------------------------------------------------------- measurements
def measurements() -> tuple[dict[tuple[str, str], float], str | None]:
    """{(op, shape): median us} from the newest GPU result JSON, and its file name."""
    files = sorted(glob.glob(str(ROOT / "bench" / "results" / "*.json")), key=os.path.getmtime)
    for path in reversed(files):
        if path.endswith(".crosscheck.json"):
            continue
        report = json.loads(Path(path).read_text())
        if report.get("gpu"):
            return {(r["op"], r["shape"]): r["median_us"] for r in report["results"]}, os.path.basename(path)
    return {}, None


# --------------------------------------------------------------------------- verdicts
EXPECTATIONS = {
    "merge_states_kernel": dict(vector=True, mma=False),
    "flash_decode_kernel": dict(vector=True, mma=True),
    "fp4_grouped_gemm_kernel": dict(vector=True, mma=True),
    "fp4_grouped_gemm_finalize_kernel": dict(vector=False, mma=False),
    "quantize_kernel": dict(vector=True, mma=False),
    "dequantize_kernel": dict(vector=True, mma=False),
    "amax_kernel": dict(vector=True, mma=False),
    "hopb_combine_kernel": dict(vector=True, mma=False),
    "hopb_all_reduce_kernel": dict(vector=True, mma=False),
    "hopb_signal_kernel": dict(vector=False, mma=False),
}


def verdict(short: str, fields: dict, histogram: Counter) -> str:
    family = next((f for f in EXPECTATIONS if re.match(rf"{f}\b", short)), None)
    problems = []
    if fields.get("LOCAL", 0) or fields.get("STACK", 0) or histogram["LDL"] or histogram["STL"]:
        problems.append("local memory (spills or a stack array)")
    expect = EXPECTATIONS.get(family, {})
    # The scalar fallbacks of the vectorized kernels (VEC = 1, or VECTOR = false).
    scalar_instance = (family in ("merge_states_kernel", "hopb_combine_kernel", "hopb_all_reduce_kernel", "amax_kernel")
                       and short.endswith(",1>")) or (family == "quantize_kernel" and short.endswith(",false>"))
    wide = histogram["LDG.128"] + histogram["LDGSTS.128"] + histogram["LDG.64"]
    if expect.get("vector") and not wide and not scalar_instance:
        problems.append("no 8/16-byte global loads")
    if expect.get("mma") and not histogram["HMMA"]:
        problems.append("no tensor-core (HMMA) instructions")
    return "OK" if not problems else "FIX: " + "; ".join(problems)


# --------------------------------------------------------------------------- the report
def render() -> str:
    info = helix_ext._C.kernel_launch_info()
    binary = library()
    usage = resource_usage(binary)
    names = sorted({name for _, name in usage})
    short = {k: short_name(v) for k, v in demangle(names).items()}
    histograms = {arch: sass_histograms(binary, arch) for arch in ("sm_90a", "sm_100a")}
    measured, source = measurements()

    lines = ["# CUDA kernels: napkin math, resources, SASS", "",
             "Generated by `python -m bench.kernels_report` from the built library (no GPU needed); CI checks it is",
             "current (`--check`). Do not edit by hand.", "",
             "## Ceilings and assumptions", "",
             f"- H200 as measured on this project's device machine: copy bandwidth {COPY_BANDWIDTH / 1e12:.1f} TB/s "
             f"(bytes read + written), bf16 matmul {BF16_TENSOR_FLOPS / 1e12:.0f} TFLOP/s; {SMS} SMs, 228 KB shared "
             "memory and 64K registers per SM.",
             "- Floor = max(bytes / copy bandwidth, flops / bf16 rate): no implementation beats it.",
             f"- Predicted = max(bytes / min({MEMORY_EFFICIENCY:.0%} of copy bandwidth, active SMs x "
             f"{PER_SM_BANDWIDTH / 1e9:.0f} GB/s), flops / ({MMA_SYNC_EFFICIENCY:.0%} of the bf16 rate: mma.sync, "
             f"not wgmma)) + {LAUNCH_US:.0f} us per launch. Occupancy from the sm_90a registers and shared memory.",
             f"- Measured: {'from ' + source if source else 'none yet: no GPU has run these kernels.'}", ""]

    lines += ["## Standard shapes", "",
              "GFLOP is the algorithmic work (the floor's); issued is the tensor work the kernel's configuration",
              "issues (tiles x warps x MMAs per warp, padding and recomputation included; flash_decode only so far,",
              "cross-checked against the SASS below), and the prediction uses it where it is known.", "",
              "| op | shape | MB moved | GFLOP | issued GFLOP | issued / algorithmic | floor us | launch | predicted us "
              "| measured us | measured / predicted |",
              "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    sass = {short[n]: histograms["sm_90a"].get(n, Counter()) for n in names}
    for builder in (merge_states_rows, flash_decode_rows, fp4_gemm_rows, quantize_rows, hopb_rows):
        for row in builder(info, usage, sass):
            op, t, launch, launches, grid, tensor_cores = row[:6]
            issued = row[6] if len(row) > 6 else None
            prediction = predicted_us(t.bytes_moved, issued if issued is not None else t.flops, grid, launches,
                                      tensor_cores)
            got = measured.get((op, t.shape))
            ratio = f"{got / prediction:.2f}" if got else "-"
            issued_cells = (f"{issued / 1e9:.2f} | {issued / t.flops:.2f}" if issued is not None and t.flops else
                            "- | -")
            lines.append(f"| {op} | {t.shape} | {t.bytes_moved / 1e6:.1f} | {t.flops / 1e9:.2f} | {issued_cells} | "
                         f"{floor_us(t.bytes_moved, t.flops):.1f} | {launch} | {prediction:.1f} | "
                         f"{f'{got:.1f}' if got else '-'} | {ratio} |")
    lines += ["", "A kernel more than 1.5x off its prediction needs an explanation or a fix (issue 8).", ""]

    lines += ["## flash_decode: MMAs per warp and tile, from the configuration and in the SASS", "",
              "Per pipeline tile a warp scores its 16 heads against TILE / WARPS_T tokens over DK ((TILE / WARPS_T / 8)",
              "x (DK / 16) MMAs) and multiplies P by its DV / WARPS_V columns of V ((DV / WARPS_V / 8) x",
              "(TILE / WARPS_T / 16)); the WARPS_V warps that share heads and tokens split the DK reduction",
              "(DK / 16 / WARPS_V k-steps each) and add their partial scores through shared memory. The tile loop",
              "body is emitted once, so the static HMMA count of the sm_90a SASS must equal it; issued /",
              "algorithmic for whole head tiles is then 1 (no score computed twice).", "",
              "| instance | from the configuration | HMMA in the SASS | agree | issued / algorithmic (whole head tiles) |",
              "|---|---:|---:|---|---:|"]
    for name, (template, hmma) in sorted(flash_decode_instances(sass).items()):
        expected = flash_decode_mmas_per_warp_tile(template)
        warps = template["warps_m"] * template["warps_v"] * template["warps_t"]
        ratio = warps * expected * MMA_FLOPS / (2 * 16 * template["warps_m"] * template["tile"]
                                                * (template["dk"] + template["dv"]))
        lines.append(f"| `{name}` | {expected} | {hmma} | {'yes' if expected == hmma else 'NO'} | {ratio:.2f} |")
    lines += [""]

    lines += ["## Resources (cuobjdump --dump-resource-usage) and SASS", "",
              "SHARED is static shared memory; the dynamic shared memory of the tiled kernels is in the launch",
              "column above. LDG.32- counts global loads narrower than 8 bytes (scalars, table lookups).", "",
              "| kernel | arch | REG | STACK | SHARED | LOCAL | LDG.128 | LDG.64 | LDG.32- | LDGSTS.128 | LDSM | HMMA | "
              "STG.128 | LDL/STL | verdict |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    verdicts = []
    for name in sorted(names, key=lambda n: short[n]):
        for arch in ("sm_90a", "sm_100a"):
            fields = usage.get((arch, name))
            if fields is None:
                continue
            h = histograms[arch].get(name, Counter())
            v = verdict(short[name], fields, h)
            verdicts.append(v)
            lines.append(f"| `{short[name]}` | {arch} | {fields['REG']} | {fields.get('STACK', 0)} | "
                         f"{fields.get('SHARED', 0)} | {fields.get('LOCAL', 0)} | {h['LDG.128']} | {h['LDG.64']} | "
                         f"{h['LDG.32-']} | {h['LDGSTS.128']} | {h['LDSM']} | {h['HMMA']} | {h['STG.128']} | "
                         f"{h['LDL'] + h['STL']} | {v} |")
    fixes = sum(v != "OK" for v in verdicts)
    lines += ["", f"Static verdict: {len(verdicts) - fixes} of {len(verdicts)} kernel instances OK"
              + (f", {fixes} to fix." if fixes else ".")]
    lines += ["", "## Reading the verdicts", "",
              "- Scalar instances (`VEC = 1`, the fallbacks for odd or unaligned rows) are expected to have no",
              "  wide loads; every other streaming kernel must load 8 or 16 bytes per thread.",
              "- flash_decode and fp4_grouped_gemm must show HMMA (mma.sync) on both archs; wgmma (HGMMA) would",
              "  be an sm_90a-only path and is not used.",
              "- Any LDL/STL, stack frame or local memory in a hot kernel is a spill to fix.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if bench/KERNELS.md differs from a fresh report")
    args = parser.parse_args(argv)
    if not helix_ext.build_info()["with_cuda"]:
        print("kernels_report: helix_ext was built without CUDA kernels: nothing to report", file=sys.stderr)
        return 2
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print("bench/KERNELS.md is not current: run `python -m bench.kernels_report` and commit it",
                  file=sys.stderr)
            return 1
        print("bench/KERNELS.md is current")
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
