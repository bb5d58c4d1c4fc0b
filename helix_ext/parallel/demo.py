"""The main job: decode a long context under Helix parallelism on N ranks and check every
generated token and logit against the same model on one rank.

Each rank loads its KV shard of the context (dealt out in blocks round-robin), then decodes
a few steps that cross ownership boundaries (context lengths differ per sequence, so the
owner changes at different steps). Rank 0 returns the tokens and logits; every rank its KV
tokens held, time per phase and bytes exchanged.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch

from helix_ext.parallel.config import HelixConfig
from helix_ext.parallel.decoder import HelixDecoder, HelixGroups
from helix_ext.parallel.launch import rank_device, spawn
from helix_ext.parallel.models import ModelConfig, ReferenceDecoder


@dataclass
class DemoSpec:
    model: ModelConfig
    helix: HelixConfig
    context_lengths: list[int]
    steps: int = 20
    seed: int = 0
    die_at_step: dict[int, int] = field(default_factory=dict)  # tests: {rank: step} ends that rank abruptly

    def first_tokens(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 1)
        return torch.randint(0, self.model.vocab_size, (len(self.context_lengths),), generator=g)


def run_rank(rank: int, backend: str, spec: DemoSpec) -> dict:
    import os

    device = rank_device(backend, rank)
    groups = HelixGroups(spec.helix, rank)
    decoder = HelixDecoder(spec.model, spec.helix, rank, groups, spec.context_lengths, spec.steps, device)
    tokens = spec.first_tokens().to(device)  # set-up: copied once; the next tokens stay on the device
    positions = list(spec.context_lengths)
    all_tokens, all_logits = [], []
    start = time.perf_counter()
    for step in range(spec.steps):
        if spec.die_at_step.get(rank) == step:
            os._exit(3)  # a rank dying mid-run (tests): the others must fail, not hang
        logits = decoder.step(tokens, positions)
        tokens = logits.argmax(dim=-1)
        all_tokens.append(tokens)
        all_logits.append(logits)
        positions = [p + 1 for p in positions]
    all_tokens, all_logits = torch.stack(all_tokens).cpu(), torch.stack(all_logits).cpu()  # waits for the device
    result = {
        "rank": rank,
        "tpa_index": decoder.layout.tpa_index,
        "kvp_index": decoder.layout.kvp_index,
        "kv_tokens_held": sum(decoder.cache.tokens_held()),
        "kv_tokens_per_sequence": decoder.cache.tokens_held(),
        "seconds": dict(decoder.timers.seconds),
        "exchange_bytes_sent": decoder.exchange.bytes_sent,
        "exchange_error_checks": getattr(decoder.exchange, "error_checks", 0),
        "decode_seconds": time.perf_counter() - start,
        "device": str(device),
    }
    if rank == 0:
        result["tokens"] = all_tokens
        result["logits"] = all_logits
    return result


def run_reference(spec: DemoSpec, model: ModelConfig | None = None,
                  forced_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The single-rank decoder on the same weights and context: (tokens [steps, B], logits
    [steps, B, vocab]). With forced_tokens it is fed those tokens (teacher forcing) instead of
    its own greedy picks, so its logits stay comparable when a near-tie flips an argmax."""
    model = model or spec.model
    reference = ReferenceDecoder(model, spec.context_lengths, spec.helix.tokens_per_block)
    tokens = spec.first_tokens()
    positions = torch.tensor(spec.context_lengths)
    all_tokens, all_logits = [], []
    for step in range(spec.steps):
        logits = reference.step(tokens, positions)
        all_tokens.append(logits.argmax(dim=-1))
        all_logits.append(logits)
        tokens = all_tokens[-1] if forced_tokens is None else forced_tokens[step]
        positions = positions + 1
    return torch.stack(all_tokens), torch.stack(all_logits)


def exact_arithmetic(model: ModelConfig) -> bool:
    return model.dtype == torch.float32 and model.expert_format == "dense"


def run_demo(spec: DemoSpec, timeout_s: float = 300.0, device: str | None = None) -> dict:
    """Spawn the ranks (on GPUs or the CPU: launch.choose_backend's device), run the reference,
    compare; returns the report."""
    started = time.perf_counter()
    ranks = spawn(run_rank, spec.helix.world_size, (spec,), timeout_s=timeout_s, device=device)
    return build_report(spec, ranks, time.perf_counter() - started)


def build_report(spec: DemoSpec, ranks: list[dict], helix_seconds: float) -> dict:
    """Compare rank 0's tokens and logits with the single-rank reference; the demo's report.

    fp32 models with plain experts must reproduce the reference's greedy tokens exactly and
    its logits to rtol = atol = 1e-5. bf16 models and FP4 experts (bf16 activations) are held
    to the model's own bf16 noise: the reference runs in fp32 on the Helix tokens (teacher
    forcing), and the logits must lie within twice the distance between the reference in
    bf16 and in fp32 (plus 1e-3)."""
    tokens, logits = ranks[0]["tokens"], ranks[0]["logits"]
    fp32_model = replace(spec.model, dtype=torch.float32)
    if exact_arithmetic(spec.model):
        reference_tokens, reference_logits = run_reference(spec)
        tokens_match = torch.equal(tokens, reference_tokens)
        if not tokens_match:  # compare the logits along the Helix tokens anyway
            _, reference_logits = run_reference(spec, forced_tokens=tokens)
        rtol = atol = 1e-5
    else:
        _, reference_logits = run_reference(spec, fp32_model, forced_tokens=tokens)
        _, bf16_logits = run_reference(spec, replace(spec.model, dtype=torch.bfloat16), forced_tokens=tokens)
        noise = (bf16_logits - reference_logits).abs().max().item()
        reference_tokens = reference_logits.argmax(dim=-1)
        tokens_match = torch.equal(tokens, reference_tokens)
        rtol, atol = 0.0, 2.0 * noise + 1e-3
    max_abs_diff = (logits - reference_logits).abs().max().item()
    logits_match = bool(torch.allclose(logits, reference_logits, rtol=rtol, atol=atol))
    exact = exact_arithmetic(spec.model)
    return {
        "matches_reference": logits_match and (tokens_match or not exact),
        "tokens_match": tokens_match,
        "logits_match": logits_match,
        "max_abs_diff": max_abs_diff,
        "tolerance": {"rtol": rtol, "atol": atol, "exact_arithmetic": exact},
        "world_size": spec.helix.world_size,
        "kvp": spec.helix.kvp,
        "tpa": spec.helix.tpa,
        "tpf": spec.helix.ffn_tp,
        "ep": spec.helix.ep,
        "tokens_per_block": spec.helix.tokens_per_block,
        "hopb_chunks": spec.helix.hopb_chunks,
        "exchange": spec.helix.exchange,
        "model": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in asdict(spec.model).items()},
        "context_lengths": spec.context_lengths,
        "decode_steps": spec.steps,
        "tokens_per_rank": [r["kv_tokens_held"] for r in ranks],
        "ranks": [{k: v for k, v in r.items() if k not in ("tokens", "logits")} for r in ranks],
        "generated_tokens": tokens.T.tolist(),
        "helix_wall_seconds": helix_seconds,
    }


def format_rank_table(ranks: list[dict]) -> str:
    """Per rank: its place, KV tokens held, seconds per phase, bytes it sent in the exchange
    (with CUDA graphs the phases are the first, eager step's and the replays are one column)."""
    graphs = any("graph" in r["seconds"] for r in ranks)  # CUDA graph replays, timed whole
    lines = [f"{'rank':>4} {'tpa':>3} {'kvp':>3} {'KV tokens':>10} {'attention s':>12} {'exchange s':>11} "
             f"{'o_proj s':>9} {'ffn s':>8} {'exchanged B':>12}" + (f" {'graph s':>8}" if graphs else "")]
    for r in ranks:
        s = r["seconds"]
        lines.append(f"{r['rank']:>4} {r['tpa_index']:>3} {r['kvp_index']:>3} {r['kv_tokens_held']:>10} "
                     f"{s.get('attention', 0):>12.3f} {s.get('exchange', 0):>11.3f} {s.get('output', 0):>9.3f} "
                     f"{s.get('ffn', 0):>8.3f} {r['exchange_bytes_sent']:>12}"
                     + (f" {s.get('graph', 0):>8.3f}" if graphs else ""))
    return "\n".join(lines)


def format_report(report: dict) -> str:
    lines = [f"Helix decode: {report['world_size']} ranks (kvp={report['kvp']} x tpa={report['tpa']}; "
             f"FFN tpf={report['tpf']} x ep={report['ep']}), model {report['model']['family']} "
             f"({report['model']['num_layers']} layers, {report['model']['dtype']}, experts "
             f"{report['model']['expert_format']}), context {report['context_lengths']} tokens, "
             f"{report['decode_steps']} decode steps, tokens_per_block {report['tokens_per_block']}, "
             f"HOP-B chunks {report['hopb_chunks']}, exchange {report['exchange']}",
             format_rank_table(report["ranks"])]
    verdict = "MATCH" if report["matches_reference"] else "MISMATCH"
    tolerance = report["tolerance"]
    lines.append(f"single-rank reference: {verdict} (tokens {'equal' if report['tokens_match'] else 'differ'}, "
                 f"max |logit diff| {report['max_abs_diff']:.2e}, tolerance rtol {tolerance['rtol']:g} "
                 f"atol {tolerance['atol']:.2g}{'' if tolerance['exact_arithmetic'] else ': the model bf16 noise'})")
    return "\n".join(lines)
