"""Command line of helix-ext.

  python -m helix_ext demo      the main job: SmolLM2-135M-Instruct answers a question about a
                                long document, decoding under Helix parallelism on N spawned
                                ranks (or under torchrun), token for token against Hugging Face
                                transformers; --model llama|deepseek: the seeded tiny models
                                over a synthesized 32K context, checked against one rank
  python -m helix_ext kernels   the ops alone: an exact merge of sharded attention, timed
  python -m helix_ext info      how the native library was built, and the GPU present now
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


def command_kernels(args) -> int:
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


def command_demo(args) -> int:
    if args.model == "smollm2":
        return command_model_demo(args)
    return command_tiny_demo(args)


def layout_from_args(args, num_kv_heads: int, default: tuple[int, int]) -> tuple[int, int]:
    """(kvp, tpa): as given; under torchrun, what is not given follows from the world size
    (default_layout); otherwise the command's default layout."""
    from helix_ext.parallel.config import default_layout
    from helix_ext.parallel.launch import torchrun_environment

    launched = torchrun_environment()
    if launched is not None:
        return default_layout(launched[1], num_kv_heads, args.kvp, args.tpa)
    return (default[0] if args.kvp is None else args.kvp, default[1] if args.tpa is None else args.tpa)


def command_model_demo(args) -> int:
    from helix_ext.parallel.config import HelixConfig, HelixConfigError
    from helix_ext.parallel.decoder import check_cuda_graphs
    from helix_ext.parallel.hf_model import MODEL_HEADS, ModelUnavailable
    from helix_ext.parallel.launch import (RankSetupError, choose_backend, default_exchange, local_world_size,
                                           run_under_torchrun, torchrun_environment)
    from helix_ext.parallel.model_demo import (compare, format_model_report, model_precision, prepare,
                                               run_model_demo, run_model_rank)

    if args.max_new_tokens < 1:
        print("--max-new-tokens must be >= 1", file=sys.stderr)
        return 2
    if not 0 <= args.speculate <= 8:
        print("--speculate must be in 1-8 (drafts per step; 0 = off)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        kvp, tpa = layout_from_args(args, MODEL_HEADS[1], default=(2, 3))
        helix = HelixConfig(kvp=kvp, tpa=tpa, tokens_per_block=args.tokens_per_block, hopb_chunks=args.hopb_chunks,
                            exchange=args.exchange or default_exchange(kvp * tpa, args.device),
                            cuda_graphs=args.cuda_graphs)
        helix.validate(*MODEL_HEADS, moe=False)  # before loading the model
        launched = torchrun_environment()
        if launched is None:
            report = run_model_demo(args.prompt, args.max_new_tokens, args.ffn_fp4, helix, timeout_s=args.timeout,
                                    verbose=not args.json, device=args.device, dtype=dtype, speculate=args.speculate)
        else:  # every rank loads the model and runs the reference on its own device
            backend = choose_backend(local_world_size(helix.world_size), args.device)
            check_cuda_graphs(helix, backend)
            rank_dtype, reference_device = model_precision(backend, dtype, launched[0])
            run, context = prepare(args.prompt, args.max_new_tokens, args.ffn_fp4, helix, False, rank_dtype,
                                   reference_device, args.speculate)
            start = time.perf_counter()
            gathered = run_under_torchrun(run_model_rank, helix.world_size, (run,), backend=backend,
                                          timeout_s=args.timeout)
            if gathered is None:  # not rank 0
                return 0
            report = compare(run, context, gathered, time.perf_counter() - start)
    except (HelixConfigError, ModelUnavailable, RankSetupError, ValueError) as error:
        print(f"demo: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        print(format_model_report(report))
    return 0 if report["matches_reference"] else 1


def command_tiny_demo(args) -> int:
    from helix_ext.parallel.config import HelixConfig, HelixConfigError
    from helix_ext.parallel.decoder import check_cuda_graphs
    from helix_ext.parallel.demo import DemoSpec, build_report, format_report, run_demo, run_rank
    from helix_ext.parallel.launch import (RankSetupError, backend_uses_gpus, choose_backend, default_exchange,
                                           local_world_size, run_under_torchrun, torchrun_environment)
    from helix_ext.parallel.models import tiny_deepseek, tiny_llama

    make_model = tiny_llama if args.model == "llama" else tiny_deepseek
    model = make_model(expert_format=args.experts, seed=args.seed)
    try:
        kvp, tpa = layout_from_args(args, model.attention_kv_heads, default=(2, 1 if args.model == "deepseek" else 2))
        exchange = args.exchange or default_exchange(kvp * tpa, args.device)
        helix = HelixConfig(kvp=kvp, tpa=tpa, tpf=args.tpf, ep=args.ep, tokens_per_block=args.tokens_per_block,
                            hopb_chunks=args.hopb_chunks, exchange=exchange, cuda_graphs=args.cuda_graphs)
        helix.validate_model(model)
    except HelixConfigError as error:
        print(f"invalid Helix config: {error}", file=sys.stderr)
        return 2
    try:
        launched = torchrun_environment()
        backend = choose_backend(local_world_size(helix.world_size), args.device)
        check_cuda_graphs(helix, backend)
    except (RankSetupError, ValueError) as error:
        print(f"demo: {error}", file=sys.stderr)
        return 2
    # float32 is the CPU's exact-arithmetic default; ranks on GPUs run bf16 (tensor cores).
    dtype = args.dtype or ("bfloat16" if backend_uses_gpus(backend) else "float32")
    model = make_model(dtype=getattr(torch, dtype), expert_format=args.experts, seed=args.seed)
    # Different lengths per sequence, so KV ownership changes hands at different steps.
    lengths = [max(0, args.context - 9 * b) for b in range(args.batch)]
    spec = DemoSpec(model=model, helix=helix, context_lengths=lengths, steps=args.steps, seed=args.seed)
    if launched is None:
        report = run_demo(spec, timeout_s=args.timeout, device=args.device)
    else:
        start = time.perf_counter()
        try:
            gathered = run_under_torchrun(run_rank, helix.world_size, (spec,), backend=backend,
                                          timeout_s=args.timeout)
        except ValueError as error:
            print(f"demo: {error}", file=sys.stderr)
            return 2
        if gathered is None:  # not rank 0
            return 0
        report = build_report(spec, gathered, time.perf_counter() - start)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "ranks"} | {"ranks": report["ranks"]}))
    else:
        print(format_report(report))
    return 0 if report["matches_reference"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helix_ext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="build and runtime information").set_defaults(run=command_info)
    demo = commands.add_parser("demo", help="the main job: SmolLM2 under Helix on N ranks vs transformers")
    demo.add_argument("--model", choices=["smollm2", "llama", "deepseek"], default="smollm2",
                      help="smollm2: SmolLM2-135M-Instruct (real weights, checked against transformers); "
                           "llama (GQA + dense FFN) or deepseek (MLA + MoE): seeded tiny models over a "
                           "synthesized context, checked against one rank (default smollm2)")
    demo.add_argument("--kvp", type=int, default=None,
                      help="KV-parallel ranks per TPA group (default 2; under torchrun: from the world size)")
    demo.add_argument("--tpa", type=int, default=None,
                      help="tensor-parallel ranks over KV heads (default 3 for smollm2: 1 or 3; 2 for llama; 1 for MLA)")
    demo.add_argument("--prompt", default=None,
                      help="smollm2: the user message (chat template applied); default: ~3,600 tokens of Python "
                           "documentation with a fact hidden in the middle and a question about it at the end")
    demo.add_argument("--max-new-tokens", type=int, default=32, help="smollm2: tokens to generate (default 32)")
    demo.add_argument("--speculate", type=int, default=0, metavar="K",
                      help="smollm2: speculative decoding, K = 1-8 prompt-lookup drafts verified per Helix step, "
                           "still checked token for token against transformers' plain greedy generate (default off)")
    demo.add_argument("--ffn-fp4", choices=["none", "nvfp4", "mxfp4"], default="none",
                      help="smollm2: FFN weights quantized with quantize_fp4 and run by fp4_grouped_gemm (default none)")
    demo.add_argument("--tpf", type=int, default=None, help="MoE: tensor-parallel ranks per expert (default N / ep)")
    demo.add_argument("--ep", type=int, default=1, help="MoE: expert-parallel groups (default 1)")
    demo.add_argument("--tokens-per-block", type=int, default=16, help="KV round-robin block (default 16)")
    demo.add_argument("--hopb-chunks", type=int, default=2, help="HOP-B batch chunks, 1 = off (default 2)")
    demo.add_argument("--exchange", choices=["nccl", "fused"], default=None,
                      help="nccl: all-to-all + merge_states and torch.distributed all-reduces; fused: peers' "
                           "partials and partial sums read in place from shared (CPU) or symmetric (GPU) memory "
                           "(default: fused for CPU ranks on one machine, nccl for GPU ranks)")
    demo.add_argument("--context", type=int, default=32768, help="tiny models: context tokens per sequence (default 32768)")
    demo.add_argument("--batch", type=int, default=4, help="tiny models: sequences (default 4)")
    demo.add_argument("--steps", type=int, default=20, help="tiny models: decode steps (default 20)")
    demo.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                      help="the ranks' dtype (default bfloat16 on GPU ranks, float32 on the CPU); smollm2: "
                           "transformers' reference runs in it too, and in bf16 the logit tolerance is measured")
    demo.add_argument("--experts", choices=["dense", "nvfp4", "mxfp4"], default="dense",
                      help="deepseek: MoE expert weights")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--timeout", type=float, default=600.0, help="seconds any collective may wait")
    demo.add_argument("--device", choices=["auto", "cuda", "cpu", "threads"], default=None,
                      help="where ranks run (default auto: one GPU per rank when the machine has "
                           "GPUs, else the CPU; fewer GPUs than ranks is an error unless cpu is asked for; "
                           "threads: every rank a thread of this process, all on GPU 0 if there is one)")
    demo.add_argument("--cuda-graphs", action="store_true",
                      help="GPU ranks on NCCL: capture the decode step in a CUDA graph once, replay it every step")
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.set_defaults(run=command_demo)
    kernels = commands.add_parser("kernels", help="the ops alone: an exact merge of sharded attention, timed")
    kernels.add_argument("--seq-len", type=int, default=4096, help="tokens in the KV cache")
    kernels.add_argument("--kvp", type=int, default=4, help="KV-parallel shards (>= 2; the last is empty)")
    kernels.add_argument("--seed", type=int, default=0)
    kernels.set_defaults(run=command_kernels)
    args = parser.parse_args(argv)
    if args.command == "kernels" and args.kvp < 2:
        parser.error("--kvp must be at least 2")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
