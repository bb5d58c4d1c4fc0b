"""Command line of helix-ext.

  python -m helix_ext info    how the native library was built, and the GPU present now
  python -m helix_ext demo    the main job (for now: an exact merge of sharded attention)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import helix_ext
from helix_ext.reference import merge_states_reference


def runtime_device() -> dict:
    if not torch.cuda.is_available():
        return {"gpu": None, "reason": "torch.cuda.is_available() is False"}
    major, minor = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "capability": f"sm_{major}{minor}",
            "multiprocessors": torch.cuda.get_device_properties(0).multi_processor_count}


def command_info(args) -> int:
    info = helix_ext.build_info()
    info["runtime_device"] = runtime_device()
    print(json.dumps(info, indent=2))
    return 0


def shard_attention(query, keys, values, scale):
    """Decode attention of one query over one KV shard: (out [H, D], lse [H]), empty shard -> (0, -inf)."""
    if keys.shape[0] == 0:
        return torch.zeros_like(query), torch.full(query.shape[:1], float("-inf"), dtype=torch.float32)
    scores = torch.einsum("hd,thd->ht", query.double(), keys.double()) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("ht,thd->hd", torch.softmax(scores, dim=-1), values.double())
    return out.to(query.dtype), lse.float()


def time_call(fn, device: str, repeats: int = 50) -> float:
    """Median microseconds of fn() (CUDA events on a GPU, wall clock on the CPU)."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e6)
    return sorted(samples)[len(samples) // 2]


def command_demo(args) -> int:
    print("helix-ext build:", json.dumps({k: v for k, v in helix_ext.build_info().items() if k != "ops"}))
    device = "cuda" if torch.cuda.is_available() and helix_ext.build_info()["with_cuda"] else "cpu"
    print(f"runtime device: {runtime_device()}; running on {device}")

    # One decode step of one sequence, KV cache sharded over KVP ranks along the sequence
    # (one rank's shard is empty), each rank producing a partial output and LSE; the
    # exchange then merges them exactly with helix.merge_states.
    torch.manual_seed(args.seed)
    heads, head_dim, seq_len, kvp = 32, 128, args.seq_len, args.kvp
    query = torch.randn(heads, head_dim, dtype=torch.bfloat16)
    keys = torch.randn(seq_len, heads, head_dim, dtype=torch.bfloat16)
    values = torch.randn(seq_len, heads, head_dim, dtype=torch.bfloat16)
    scale = head_dim ** -0.5
    bounds = [0] + sorted(torch.randint(0, seq_len, (kvp - 2,)).tolist()) + [seq_len, seq_len]
    partials = [shard_attention(query, keys[a:b], values[a:b], scale) for a, b in zip(bounds, bounds[1:])]
    parts_out = torch.stack([p[0] for p in partials]).unsqueeze(1)  # [P, B=1, H, D]
    parts_lse = torch.stack([p[1] for p in partials]).unsqueeze(1)  # [P, B=1, H]
    merged_out, merged_lse = helix_ext.merge_states(parts_out.to(device), parts_lse.to(device))
    full_out, full_lse = shard_attention(query, keys, values, scale)
    error = (merged_out[0].cpu().double() - full_out.double()).abs().max().item()
    lse_error = (merged_lse[0].cpu() - full_lse).abs().max().item()
    print(f"sharded attention: {seq_len} tokens over {kvp} KV shards of sizes "
          f"{[b - a for a, b in zip(bounds, bounds[1:])]}; merged vs unsharded: "
          f"max |out error| {error:.2e} (bf16 ulp at 1.0 is 7.8e-03), max |lse error| {lse_error:.2e}")
    if not (error < 2 ** -6 and lse_error < 1e-4):
        print("FAILED: the merge does not reproduce unsharded attention", file=sys.stderr)
        return 1

    # The Helix exchange at scale: P=8 partials for a batch of 64, 128 heads of 512 (bf16).
    shape = (8, 64, 128, 512) if device == "cuda" else (8, 8, 128, 512)
    parts_out = torch.randn(shape, dtype=torch.bfloat16, device=device)
    parts_lse = torch.randn(shape[:3], device=device) * 4
    micros = time_call(lambda: helix_ext.merge_states(parts_out, parts_lse), device)
    peer = time_call(lambda: merge_states_reference(parts_out, parts_lse, compute_dtype=torch.float32), device)
    moved = parts_out.numel() * 2 + parts_lse.numel() * 4 + parts_out[0].numel() * 2 + parts_lse[0].numel() * 4
    print(f"merge_states P,B,H,D={shape} bf16 on {device}: {micros:.1f} us median "
          f"({moved / micros / 1e3:.1f} GB/s), eager torch {peer:.1f} us ({peer / micros:.1f}x)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helix_ext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="build and runtime information").set_defaults(run=command_info)
    demo = commands.add_parser("demo", help="the main job: an exact merge of sharded decode attention")
    demo.add_argument("--seq-len", type=int, default=4096, help="tokens in the KV cache")
    demo.add_argument("--kvp", type=int, default=4, help="KV-parallel shards (>= 2; the last is empty)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=command_demo)
    args = parser.parse_args(argv)
    if getattr(args, "kvp", 2) < 2:
        parser.error("--kvp must be at least 2")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
