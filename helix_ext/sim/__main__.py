"""Command line of the Helix simulator.

  python -m helix_ext.sim reproduce [--json] [--plot DIR] [--latency-us X]
      the paper's two studies (1M context, GB200 NVL72, FP4): the headline table (best
      baseline vs Helix) and the per-collective latency sensitivity table; --json prints only
      {"deepseek-r1": {"throughput_gain", "interactivity_gain"}, "llama-405b": {...},
      "hopb_ablation": {"deepseek-r1", "llama-405b"}} at the chosen latency.
  python -m helix_ext.sim plan --model deepseek-r1 --context 1M --gpus 64 --ttl-ms 30
      the best sharding under a TTL budget, with its throughput, interactivity and memory per
      GPU, next to the best baseline. --model takes a built-in name or a config.json path.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

from helix_ext.sim.costs import ModelingOptions
from helix_ext.sim.hardware import DEFAULT_COLLECTIVE_LATENCY_US, GB200_NVL72, HARDWARE, get_hardware
from helix_ext.sim.models import MODELS, get_model
from helix_ext.sim.study import (headline_json, headline_table, plan, plan_text, reproduce, sensitivity_json,
                                 sensitivity_table)


def parse_tokens(text: str) -> int:
    """'1M' -> 1,000,000; '128K' / '128k' -> 128,000; '1048576' as is."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a token count like 1M, 128K or 1048576, got {text!r}")
    value = float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match.group(2).lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least one token, got {text!r}")
    return int(round(value))


def _options(args) -> ModelingOptions:
    if args.speculate and args.accepted is None:
        raise ValueError("--speculate K needs --accepted A: the tokens a step produces per request on average "
                         "(1 to K + 1; the demo's prompt lookup measured 1.94 at K = 4)")
    accepted = 1.0 if args.accepted is None else args.accepted
    return ModelingOptions(kernel_time=args.kernel_time, mla_exchange=args.mla_exchange, draft_tokens=args.speculate,
                           accepted_per_step=accepted)


def _add_model_switches(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--latency-us", type=float, default=DEFAULT_COLLECTIVE_LATENCY_US,
                        help=f"per-collective latency in us (default {DEFAULT_COLLECTIVE_LATENCY_US:g})")
    parser.add_argument("--bench", metavar="JSON", default=None,
                        help="a bench/results JSON whose measured bandwidth and kernel efficiencies override "
                             "the datasheet figures")
    parser.add_argument("--kernel-time", choices=["max", "sum"], default="max",
                        help="a kernel costs the max (default) or the sum of its memory and compute times")
    parser.add_argument("--mla-exchange", choices=["latent", "value"], default="value",
                        help="MLA exchange width: v_head_dim (default, W_UV before the exchange, the paper's B x H x D) "
                             "or the 512-wide latent (W_UV after the merge, as helix_ext.parallel does today)")
    parser.add_argument("--speculate", type=int, default=0, metavar="K",
                        help="speculative decoding: K drafts verified per step (each layer runs K + 1 tokens per "
                             "request; attention reads the KV once for them); default 0, off")
    parser.add_argument("--accepted", type=float, default=None, metavar="A",
                        help="with --speculate: tokens a step produces per request on average, in [1, K + 1]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helix_ext.sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    rep = commands.add_parser("reproduce", help="the paper's studies, headline and latency tables")
    rep.add_argument("--json", action="store_true", help="print only the headline JSON")
    rep.add_argument("--plot", metavar="DIR", default=None, help="write the frontier PNGs into DIR")
    rep.add_argument("--sensitivity-json", action="store_true", help="with --json: add the latency sweep "
                     "under the key 'by_latency_us' (not part of the headline shape)")
    _add_model_switches(rep)
    pl = commands.add_parser("plan", help="the best sharding under a TTL budget")
    pl.add_argument("--model", required=True, help=f"one of {sorted(MODELS)} or a path to a config.json")
    pl.add_argument("--context", type=parse_tokens, required=True, help="tokens of context per request, e.g. 1M")
    pl.add_argument("--gpus", type=int, required=True, help="GPUs available")
    pl.add_argument("--ttl-ms", type=float, required=True, help="token-to-token latency budget, ms")
    pl.add_argument("--hardware", default="gb200-nvl72", choices=sorted(HARDWARE))
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_model_switches(pl)
    args = parser.parse_args(argv)

    try:
        if args.command == "reproduce":
            hardware = GB200_NVL72.with_benchmark(args.bench) if args.bench else GB200_NVL72
            start = time.perf_counter()
            result = reproduce(args.latency_us, hardware=hardware, options=_options(args))
            elapsed = time.perf_counter() - start
            if args.json:
                out = headline_json(result["headline"])
                if args.sensitivity_json:
                    out["by_latency_us"] = sensitivity_json(result)
                print(json.dumps(out))
            else:
                print(headline_table(result))
                print()
                print(sensitivity_table(result))
                print(f"\n({len(result['by_latency'])} latencies x 2 studies swept in {elapsed:.1f} s)")
            if args.plot:
                from helix_ext.sim.plot import plot_reproduction

                for path in plot_reproduction(result, args.plot):
                    print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
        else:
            hardware = get_hardware(args.hardware)
            if args.bench:
                hardware = hardware.with_benchmark(args.bench)
            hardware = hardware.with_latency_us(args.latency_us)
            model = get_model(args.model)
            result = plan(model, hardware, args.context, args.gpus, args.ttl_ms * 1e-3, _options(args))
            if args.json:
                print(json.dumps(result.as_dict(), indent=2))
            else:
                print(plan_text(model, hardware, args.context, result))
    except (ValueError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
