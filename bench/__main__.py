"""Roofline runner: python -m bench [--quick | --smoke] [--device cpu|cuda] [--out-dir DIR]

Measures the device's copy bandwidth first, then every op at its benchmark shapes, and
prints one table: shape, median us, achieved GB/s, fraction of copy bandwidth, peer median
us, speedup over the peer. Writes bench/results/<gpu>-<date>-<commit>.json (also to
--out-dir when given, e.g. $OUT on the device machine). On a GPU with cupy installed,
cupyx.profiler.benchmark times each op's standard shape as an independent cross-check of
the event timings (written beside the JSON as <name>.crosscheck.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import helix_ext
from bench.cases import cases
from bench.timing import Timer, copy_bandwidth_gbs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def git_commit() -> str:
    if os.environ.get("HELIX_COMMIT"):
        return os.environ["HELIX_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("-dirty" if dirty else "")) if commit else "unknown"


def driver_version() -> str | None:
    if shutil.which("nvidia-smi"):
        try:
            text = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=60).stdout.strip()
            if text:
                return text.splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # noqa: BLE001  (pynvml missing or no driver: the field stays empty)
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cupy_cross_check(case, repeats: int) -> dict | None:
    try:
        from cupyx.profiler import benchmark
    except ImportError:
        return None
    result = benchmark(case.run, n_repeat=repeats, n_warmup=10)
    gpu_us = float(sorted(result.gpu_times[0])[len(result.gpu_times[0]) // 2] * 1e6)
    return {"op": case.op, "shape": case.shape, "cupy_median_us": gpu_us,
            "note": "cupyx.profiler.benchmark, warm L2 (no flush between calls)"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="standard shapes only, fewer repeats")
    size.add_argument("--smoke", action="store_true", help="tiny shapes: checks the harness, not the speed")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when a GPU and CUDA kernels are there")
    parser.add_argument("--out-dir", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--no-save", action="store_true", help="do not write into bench/results/")
    args = parser.parse_args(argv)

    cuda_ready = torch.cuda.is_available() and helix_ext.build_info()["with_cuda"]
    device = args.device or ("cuda" if cuda_ready else "cpu")
    if device == "cuda" and not cuda_ready:
        parser.error("--device cuda needs a GPU and helix_ext's CUDA kernels")
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    if device == "cuda":
        timer = Timer(device, warmup=10, repeats=30 if mode != "full" else 100)
    else:
        # Three warm-up calls: merge_states' standard shape took 4.1-4.8 ms after one and
        # 2.8-3.1 ms after three (fresh outputs' first touches), timed alone on the 2-core VM.
        timer = Timer(device, warmup=1 if mode == "smoke" else 3, repeats=3 if mode != "full" else 11)

    copy_gbs = copy_bandwidth_gbs(device, timer)
    name = torch.cuda.get_device_name() if device == "cuda" else None
    report = {
        "gpu": name,
        "cpu": cpu_name() if device == "cpu" else None,
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "driver": driver_version() if device == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device == "cuda" else None,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_bandwidth_gbs": round(copy_gbs, 1),
        "results": [],
    }
    where = name or f"CPU ({report['cpu']}, {os.cpu_count()} cores, {report['threads']} torch threads)"
    print(f"device: {where}; copy bandwidth {copy_gbs:.1f} GB/s (read + write); mode {mode}")
    header = (f"{'op':<17} {'shape':<58} {'median us':>10} {'GB/s':>9} {'of copy':>8} {'peer us':>10} "
              f"{'speedup':>8}  peer")
    print(header)
    print("-" * len(header))
    slug = re.sub(r"[^a-z0-9]+", "-", (name or "cpu").lower()).strip("-")
    stem = f"{slug}-{datetime.date.today().strftime('%Y%m%d')}-{report['commit']}" + ("-smoke" if mode == "smoke" else "")
    targets = ([] if args.no_save else [RESULTS]) + ([args.out_dir] if args.out_dir else [])
    cross_checks, cross_checked_ops = [], set()

    def save() -> None:  # after every shape, so a run cut off by a time limit still reports
        for directory in targets:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
            if cross_checks:
                (directory / f"{stem}.crosscheck.json").write_text(json.dumps(cross_checks, indent=2) + "\n")

    for case in cases(device, mode):
        median = timer.median_us(case.run)
        achieved = case.bytes_moved / median / 1e3
        peer_name, peer_median, peer_times = None, None, {}
        for label, call in case.peers:
            try:
                candidate = timer.median_us(call)
            except Exception as error:  # noqa: BLE001  (a peer that cannot run this shape is skipped)
                print(f"  peer {label} failed on {case.shape}: {type(error).__name__}: {str(error)[:200]}")
                continue
            peer_times[label] = round(candidate, 2)
            if peer_median is None or candidate < peer_median:
                peer_name, peer_median = label, candidate
        entry = {
            "op": case.op, "shape": case.shape, "median_us": round(median, 2),
            # Four significant digits: small CPU shapes move well under 0.1 GB/s, and a fixed
            # number of decimals would record them as 0.
            "achieved_gbs": float(f"{achieved:.4g}"), "fraction_of_copy_bw": float(f"{achieved / copy_gbs:.4g}"),
            "peer": peer_name,
            "peer_median_us": round(peer_median, 2) if peer_median else None,
            "speedup_vs_peer": round(peer_median / median, 2) if peer_median else None,
            "peers_us": peer_times,  # every peer that ran (the fastest is "peer")
        }
        report["results"].append(entry)
        if case.overlap_parts is not None:
            chunks, attention, exchange = case.overlap_parts
            t_c, t_m = timer.median_us(attention), timer.median_us(exchange)
            ideal = max(chunks * t_c + t_m, t_c + chunks * t_m)
            entry["shape"] += f"; t_c={t_c:.1f}us t_m={t_m:.1f}us ideal={ideal:.1f}us"
            print(f"  HOP-B overlap: pipelined {median:.1f} us, serial {peer_median:.1f} us, ideal "
                  f"max(n*t_c + t_m, t_c + n*t_m) = {ideal:.1f} us (t_c {t_c:.1f}, t_m {t_m:.1f}): "
                  f"{ideal / median:.0%} of ideal")
        peer_text = f"{peer_median:>10.1f} {peer_median / median:>7.2f}x" if peer_median else f"{'-':>10} {'-':>8}"
        print(f"{case.op:<17} {case.shape:<58} {median:>10.1f} {achieved:>9.1f} "
              f"{achieved / copy_gbs:>8.3f} {peer_text}  {peer_name or ''}")
        for label, micros in peer_times.items():
            if label != peer_name:
                print(f"  other peer {label}: {micros:.1f} us ({micros / median:.2f}x)")
        if device == "cuda" and case.op not in cross_checked_ops:
            cross_checked_ops.add(case.op)  # the op's standard shape comes first
            check = cupy_cross_check(case, repeats=timer.repeats)
            if check is None:
                print("  cupy is not installed: no cross-check of the event timings")
            else:
                cross_checks.append(check)
                print(f"  cross-check (cupy) {case.op} {case.shape}: {check['cupy_median_us']:.1f} us median")
        del case
        save()
    for directory in targets:
        print(f"wrote {directory / (stem + '.json')}")

    return 0


if __name__ == "__main__":
    sys.exit(main())
