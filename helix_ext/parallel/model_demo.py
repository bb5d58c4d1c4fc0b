"""The main job: a real model (SmolLM2-135M-Instruct) decoding under Helix on N CPU ranks (or
GPUs), token for token against Hugging Face transformers.

1. transformers runs its own greedy ``generate`` on the chat-templated prompt: the reference
   text and logits. Its first forward is the prefill: the prompt's KV cache and the first new
   token come from it (prefill is not what Helix parallelizes).
2. N = KVP x TPA ranks start; each takes its TPA group's heads, its TP slices of the
   projections and FFN, and its blocks of the prompt's KV (block b on KVP rank b % kvp).
3. The ranks decode the rest under Helix: owner-only, staggered KV appends, flash_decode on
   the shard, all-to-all + merge_states, TP output projection and FFN with all-reduces.
4. Rank 0's tokens and logits are compared with transformers'.

The model and the prefill KV reach the spawned ranks through shared memory (torch
multiprocessing), not copies; under torchrun every rank loads the model and prefills itself.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

from helix_ext.parallel.config import HelixConfig
from helix_ext.parallel.decoder import HelixDecoder, HelixGroups, check_cuda_graphs
from helix_ext.parallel.demo import format_rank_table
from helix_ext.parallel.launch import backend_uses_gpus, choose_backend, local_rank, rank_device, spawn
from helix_ext.parallel.models import ModelConfig

# How far the runtime's logits may lie from transformers' when both run in float32 (SmolLM2's
# logits reach ~40):
#  "none": fp32 noise only (other summation orders in sharded matmuls, all-reduces, flash_decode
#          vs SDPA); measured 4e-5 on short prompts, 1.3e-4 on the 3.6K-token demo prompt.
#  FP4/bf16 FFN: fp4_grouped_gemm returns bf16, so each TP rank's partial FFN output is rounded
#          to bf16 before the all-reduce, where the single-rank reference rounds the whole sum
#          once: measured 0.3-0.5 at TP = 2-3. Tokens may then differ only at a near-tie (the
#          reference's margin between the two tokens within the tolerance).
# In bf16 (GPU ranks) the tolerance is measured on every run instead (see measured_tolerance).
LOGIT_TOLERANCE = {"none": 1e-3, "fp4": 1.0}


def logit_tolerance(ffn_format: str) -> float:
    return LOGIT_TOLERANCE["none" if ffn_format == "none" else "fp4"]


def measured_tolerance(bf16_noise: float, ffn_format: str) -> float:
    """The bound on |Helix - transformers| logits when both run in bf16: each lies within the
    bf16 noise of the exact (fp32) logits, noise measured as transformers' own bf16-vs-fp32
    distance on the same tokens, so the two lie within twice that of each other. An FP4 FFN
    adds what the reference cannot show: each TP rank's partial FFN sum rounded to bf16 before
    the all-reduce (LOGIT_TOLERANCE's measured fp32 bound)."""
    return 2.0 * bf16_noise + (0.0 if ffn_format == "none" else logit_tolerance(ffn_format))


@dataclass
class ModelRun:
    model: ModelConfig            # dtype: the ranks' (float32 on the CPU, bfloat16 on GPUs)
    helix: HelixConfig
    weights: dict                 # float32, on the host (shared with spawned ranks, cast by each)
    keys: list[torch.Tensor]      # per layer [T, Hkv, D]: the prompt's KV from the prefill
    values: list[torch.Tensor]
    first_token: int
    max_new_tokens: int
    eos_token_id: int | None
    prompt_ids: list[int] | None = None  # the drafts' source (speculation)
    speculate: int = 0            # drafts verified per Helix step (prompt lookup; 0 = plain decoding)


def run_model_rank(rank: int, backend: str, run: ModelRun) -> dict:
    device = rank_device(backend, rank)
    groups = HelixGroups(run.helix, rank)
    prompt_tokens = run.keys[0].shape[0]
    block = run.helix.tokens_per_block

    def prefill_block(layer, sequence, index):
        rows = slice(index * block, min((index + 1) * block, prompt_tokens))
        return run.keys[layer][rows], run.values[layer][rows]

    decoder = HelixDecoder(run.model, run.helix, rank, groups, [prompt_tokens], run.max_new_tokens, device,
                           weights=run.weights, context=prefill_block, max_step_tokens=run.speculate + 1)
    start = time.perf_counter()
    accepted_per_step = None
    if run.speculate:
        # Speculative decoding: each step verifies run.speculate prompt-lookup drafts (the host
        # reads every step's logits to accept or reject them).
        from helix_ext.parallel.speculative import speculative_generate

        result = speculative_generate(decoder, [run.first_token], [prompt_tokens], run.max_new_tokens - 1,
                                      run.speculate, histories=[list(run.prompt_ids) + [run.first_token]],
                                      keep_logits=True)
        generated = [run.first_token] + result.tokens[0]
        logits = list(torch.cat(result.logits[0])[:run.max_new_tokens - 1]) if result.logits[0] else []
        steps_run, accepted_per_step = result.steps, [row[0] for row in result.accepted_per_step]
    else:
        # Greedy decoding that never waits for the device: the next token stays there (argmax of
        # the step's logits), every step runs (an EOS is cut after the run), and the tokens and
        # logits are read once at the end.
        token = torch.tensor([run.first_token], device=device)  # set-up: copied once
        tokens, logits = [], []
        for step in range(run.max_new_tokens - 1):
            step_logits = decoder.step(token, [prompt_tokens + step])[0]
            token = step_logits.argmax(dim=-1, keepdim=True)
            tokens.append(token)
            logits.append(step_logits)
        generated = [run.first_token] + (torch.cat(tokens).tolist() if tokens else [])  # waits for the device
        steps_run = len(tokens)
    decode_seconds = time.perf_counter() - start
    tokens_decoded = len(generated) - 1
    if run.eos_token_id in generated:  # as generate stops: the EOS is the last token
        generated = generated[:generated.index(run.eos_token_id) + 1]
    result = {
        "rank": rank,
        "tpa_index": decoder.layout.tpa_index,
        "kvp_index": decoder.layout.kvp_index,
        "q_heads": [decoder.layout.q_heads.start, decoder.layout.q_heads.stop],
        "merged_heads": [decoder.layout.merged_heads.start, decoder.layout.merged_heads.stop],
        "kv_tokens_held": sum(decoder.cache.tokens_held()),
        "seconds": dict(decoder.timers.seconds),
        "exchange_bytes_sent": decoder.exchange.bytes_sent,
        "decode_seconds": decode_seconds,
        "device": str(device),
        "steps_run": steps_run,  # every step runs, also past an EOS: the KV, bytes and times count them all
        "tokens_decoded": tokens_decoded,  # the tokens those steps made (more than the steps when speculating)
        "accepted_per_step": accepted_per_step,  # speculation: drafts accepted at each step
    }
    if rank == 0:
        result["tokens"] = generated
        kept = logits[:len(generated) - 1]
        result["logits"] = (torch.stack(kept).float().cpu() if kept else torch.empty(0, run.model.vocab_size))
    return result


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def prepare(prompt: str | None, max_new_tokens: int, ffn_format: str, helix: HelixConfig, verbose: bool = False,
            dtype: torch.dtype = torch.float32, device: torch.device | None = None, speculate: int = 0):
    """Load the model, run transformers' reference (with the same FFN format, in `dtype` on
    `device`: float32 on the CPU, or bf16 on a GPU), and build the ranks' work (in `dtype`).
    In bf16 the reference's noise is measured too: the float32 model's logits on the bf16
    reference's tokens (teacher forced), against the bf16 ones. Returns (run, context dict
    for the report)."""
    from helix_ext.parallel import hf_model

    device = device or torch.device("cpu")
    started = time.perf_counter()
    model, tokenizer = hf_model.load_model(verbose=verbose)
    config = replace(hf_model.model_config(model.config, ffn_format), dtype=dtype)
    helix.validate(config.num_q_heads, config.num_kv_heads, moe=False)
    user_text = prompt if prompt is not None else hf_model.needle_prompt()
    ids = hf_model.chat_ids(tokenizer, user_text)
    if len(ids) + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"{model.config.max_position_embeddings}-token context")
    load_seconds = time.perf_counter() - started
    weights = hf_model.helix_weights(model, ffn_format)
    reference_model = hf_model.reference_copy(model, device, dtype)
    if verbose:
        print(f"{config.name}: prompt of {len(ids)} tokens; transformers generates the reference in {dtype} on "
              f"{device} (its prefill also makes the KV the ranks are dealt)...", flush=True)
    with hf_model.helix_ffn(reference_model, weights, ffn_format):
        reference = hf_model.reference_generate(reference_model, ids, max_new_tokens)
    context = {"tokenizer": tokenizer, "prompt_ids": ids, "reference": reference, "load_seconds": load_seconds,
               "user_text": user_text, "unquantized_tokens": None, "bf16_noise": None,
               "reference_device": str(device)}
    if dtype != torch.float32:
        exact_model = hf_model.reference_copy(model, device, torch.float32)
        with hf_model.helix_ffn(exact_model, weights, ffn_format):
            exact = hf_model.teacher_forced_logits(exact_model, ids, reference.tokens)
        context["bf16_noise"] = float((reference.logits - exact).abs().max())
        del exact_model
    if ffn_format != "none":  # how far the FFN format's greedy text follows the unquantized model's
        context["unquantized_tokens"] = hf_model.reference_generate(reference_model, ids, max_new_tokens).tokens
    del reference_model
    run = ModelRun(model=config, helix=helix, weights=weights, keys=reference.keys, values=reference.values,
                   first_token=reference.tokens[0], max_new_tokens=max_new_tokens,
                   eos_token_id=tokenizer.eos_token_id, prompt_ids=list(ids), speculate=speculate)
    return run, context


def top2_margins(logits: torch.Tensor) -> torch.Tensor:
    """Per row, the gap between the largest and the second largest logit."""
    top = logits.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def compare(run: ModelRun, context: dict, ranks: list[dict], helix_seconds: float) -> dict:
    tokenizer, reference = context["tokenizer"], context["reference"]
    tokens, logits = ranks[0]["tokens"], ranks[0]["logits"]
    tokens_match = tokens == reference.tokens
    agreeing = agreeing_prefix(tokens, reference.tokens)
    # Runtime step j consumed tokens[:j + 1] and made token j + 1, as transformers' logits[j + 1]
    # did: compared while both saw the same tokens (up to and including a divergent step).
    steps = min(len(logits), len(reference.logits) - 1, agreeing)
    diffs = (logits[:steps] - reference.logits[1:steps + 1]).abs().amax(dim=-1)
    max_abs_diff = float(diffs.max()) if steps else 0.0
    logits_finite = bool(torch.isfinite(logits).all())
    noise = context["bf16_noise"]
    tolerance = (logit_tolerance(run.model.ffn_format) if noise is None else
                 measured_tolerance(noise, run.model.ffn_format))
    logits_match = logits_finite and max_abs_diff <= tolerance
    near_tie, margin = False, None
    if not tokens_match and agreeing < min(len(tokens), len(reference.tokens)):
        chosen, expected = tokens[agreeing], reference.tokens[agreeing]
        margin = float(reference.logits[agreeing][expected] - reference.logits[agreeing][chosen])
        near_tie = margin <= tolerance
    # fp32 with the plain FFN is exact up to summation order: every token must agree. Otherwise
    # tokens agree until the reference's top-2 margin falls within the tolerance (a near-tie).
    exact = run.model.ffn_format == "none" and run.model.dtype == torch.float32
    matches = logits_match and (tokens_match or (near_tie and not exact))
    margins = top2_margins(reference.logits[1:len(reference.tokens)])
    report = {
        "model": run.model.name,
        "ffn_format": run.model.ffn_format,
        "prompt_tokens": len(context["prompt_ids"]),
        "generated_text": tokenizer.decode(tokens, skip_special_tokens=True),
        "reference_text": tokenizer.decode(reference.tokens, skip_special_tokens=True),
        "generated_tokens": tokens,
        "reference_tokens": reference.tokens,
        "matches_reference": matches,
        "tokens_match": tokens_match,
        "tokens_agreeing": agreeing,
        "divergence_margin": margin,
        "divergence_is_near_tie": near_tie,
        "logits_match": logits_match,
        "logits_finite": logits_finite,
        "max_abs_logit_diff": max_abs_diff,
        "logit_tolerance": tolerance,
        "dtype": str(run.model.dtype).removeprefix("torch."),
        "bf16_noise": noise,
        "tolerance_source": ("constant: fp32 summation-order noise" if noise is None else
                             "measured: 2 x transformers' bf16-vs-fp32 logit distance on its own tokens"
                             + ("" if run.model.ffn_format == "none" else " + the FP4 partial-sum bound")),
        "reference_device": context["reference_device"],
        "min_top2_margin": float(margins.min()) if margins.numel() else None,
        "first_near_tie_step": (int((margins <= tolerance).nonzero()[0, 0]) + 1
                                if bool((margins <= tolerance).any()) else None),
        "world_size": run.helix.world_size,
        "kvp": run.helix.kvp,
        "tpa": run.helix.tpa,
        "tokens_per_block": run.helix.tokens_per_block,
        "hopb_chunks": run.helix.hopb_chunks,
        "exchange": run.helix.exchange,
        "kv_blocks": math.ceil(len(context["prompt_ids"]) / run.helix.tokens_per_block),
        "decode_steps": len(logits),
        "decode_steps_run": ranks[0]["steps_run"],  # past an EOS too (the table's KV, bytes, times count them)
        "load_seconds": context["load_seconds"],
        "reference_seconds": reference.seconds,
        # Decode rates, prefill excluded: transformers' generate from its first new token on;
        # Helix's decode loop on its slowest rank (every step it ran).
        "reference_decode_tokens_per_second": (reference.decode_tokens / reference.decode_seconds
                                               if reference.decode_seconds > 0 else None),
        "helix_decode_tokens_per_second": (ranks[0]["tokens_decoded"] / max(r["decode_seconds"] for r in ranks)
                                           if ranks[0]["tokens_decoded"] else None),
        "speculate": run.speculate,
        "helix_steps": ranks[0]["steps_run"],
        "accepted_per_step": ranks[0]["accepted_per_step"],
        "helix_decode_seconds": max(r["decode_seconds"] for r in ranks),
        "helix_wall_seconds": helix_seconds,
        "tokens_per_rank": [r["kv_tokens_held"] for r in ranks],
        "ranks": [{k: v for k, v in r.items() if k not in ("tokens", "logits")} for r in ranks],
    }
    if context["unquantized_tokens"] is not None:
        report["unquantized_reference_text"] = tokenizer.decode(context["unquantized_tokens"], skip_special_tokens=True)
        report["tokens_agreeing_with_unquantized"] = agreeing_prefix(tokens, context["unquantized_tokens"])
    return report


def model_precision(backend: str, dtype: torch.dtype | None = None, rank: int = 0) -> tuple[torch.dtype, torch.device]:
    """(the ranks' dtype, the reference's device) for ranks on `backend`: bf16 and the rank's
    GPU (GPU 0 for spawned or threaded ranks) when the ranks run on GPUs (flash_decode's CUDA
    kernel takes bf16/fp16), else float32 on the CPU, as transformers' own default; `dtype`
    overrides the dtype (bf16 CPU ranks measure the bf16 path without a GPU)."""
    if backend_uses_gpus(backend):
        index = local_rank(rank) if backend == "nccl" else 0
        return dtype or torch.bfloat16, torch.device("cuda", index)
    return dtype or torch.float32, torch.device("cpu")


def run_model_demo(prompt: str | None, max_new_tokens: int, ffn_format: str, helix: HelixConfig,
                   timeout_s: float = 600.0, verbose: bool = False, device: str | None = None,
                   dtype: torch.dtype | None = None, speculate: int = 0) -> dict:
    """The main job on spawned (or threaded) ranks: device as launch.choose_backend takes it
    (GPUs when the machine has them, else the CPU)."""
    backend = choose_backend(helix.world_size, device)
    check_cuda_graphs(helix, backend)
    dtype, reference_device = model_precision(backend, dtype)
    run, context = prepare(prompt, max_new_tokens, ffn_format, helix, verbose, dtype, reference_device, speculate)
    if verbose:
        print(f"decoding under Helix on {helix.world_size} ranks (kvp={helix.kvp} x tpa={helix.tpa}, {backend}, "
              f"{dtype})...", flush=True)
    started = time.perf_counter()
    ranks = spawn(run_model_rank, helix.world_size, (run,), backend=backend, timeout_s=timeout_s)
    return compare(run, context, ranks, time.perf_counter() - started)


def format_model_report(report: dict) -> str:
    fp4 = report["ffn_format"] != "none"
    lines = [f"{report['model']} under Helix: {report['world_size']} ranks (kvp={report['kvp']} x tpa={report['tpa']}, "
             f"FFN TP={report['world_size']}, FFN weights {report['ffn_format']}), prompt {report['prompt_tokens']} tokens "
             f"= {report['kv_blocks']} KV blocks of {report['tokens_per_block']} dealt round-robin, "
             f"{report['decode_steps']} tokens decoded (the first new token comes from the prefill"
             + (f"; {report['decode_steps_run']} ran, the table counts them all, the text ends at the EOS)"
                if report["decode_steps_run"] != report["decode_steps"] and not report["speculate"] else ")"),
             format_rank_table(report["ranks"]),
             "",
             f"Helix:        {report['generated_text']!r}",
             f"transformers: {report['reference_text']!r}" + (f"  (with the same {report['ffn_format']} FFN)" if fp4 else "")]
    if fp4:
        lines.append(f"unquantized:  {report['unquantized_reference_text']!r}  "
                     f"({report['tokens_agreeing_with_unquantized']} tokens agree before the first divergence)")
    verdict = "IDENTICAL token for token" if report["tokens_match"] else (
        f"DIFFERENT after {report['tokens_agreeing']} tokens (transformers' margin there "
        f"{report['divergence_margin']:.3g}: {'a near-tie' if report['divergence_is_near_tie'] else 'not a near-tie'})")
    lines.append(f"{verdict}; max |logit diff| {report['max_abs_logit_diff']:.2e} over {report['decode_steps']} steps "
                 f"(tolerance {report['logit_tolerance']:.3g}, {report['tolerance_source']}); "
                 f"{'MATCH' if report['matches_reference'] else 'MISMATCH'}")
    if report["bf16_noise"] is not None:
        near_tie = report["first_near_tie_step"]
        lines.append(f"{report['dtype']}: transformers' bf16 noise {report['bf16_noise']:.3g} (max |bf16 - fp32 logit| "
                     f"on {report['reference_device']}); its smallest top-2 margin {report['min_top2_margin']:.3g}, "
                     + ("no near-tie" if near_tie is None else f"first within the tolerance at token {near_tie}"))
    if report["speculate"]:
        tokens = report["decode_steps"]
        lines.append(f"speculation: {report['speculate']} prompt-lookup drafts a step; {report['helix_steps']} Helix "
                     f"steps made {tokens} tokens ({tokens / max(1, report['helix_steps']):.2f} per step; drafts "
                     f"accepted per step: {report['accepted_per_step']}); decode {report['helix_decode_seconds']:.2f} s")
    helix_rate, reference_rate = report["helix_decode_tokens_per_second"], report["reference_decode_tokens_per_second"]
    if helix_rate and reference_rate:
        lines.append(f"decode rate (prefill excluded): Helix {helix_rate:.2f} tokens/s (slowest rank), transformers "
                     f"{reference_rate:.2f} tokens/s: {helix_rate / reference_rate:.2f}x")
    lines.append(f"(load {report['load_seconds']:.1f} s, transformers generate {report['reference_seconds']:.1f} s, "
                 f"Helix ranks {report['helix_wall_seconds']:.1f} s wall incl. start-up)")
    return "\n".join(lines)
