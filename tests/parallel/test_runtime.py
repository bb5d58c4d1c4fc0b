"""The Helix runtime end to end on spawned CPU processes (gloo): every decode step of N ranks
against the same model on one rank."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helix_ext.parallel.config import HelixConfig
from helix_ext.parallel.demo import DemoSpec, run_demo, run_rank
from helix_ext.parallel.launch import spawn
from helix_ext.parallel.models import tiny_deepseek, tiny_llama

ROOT = Path(__file__).resolve().parents[2]
# Lengths around block edges (tokens_per_block 4): ownership changes hands during the 9
# decode steps, a sequence starts empty, another shorter than one block per rank.
LENGTHS = [37, 20, 5, 0]


def check(report, block):
    assert report["matches_reference"], (report["max_abs_diff"], report["tokens_match"], report["tolerance"])
    per_sequence = torch.tensor([r["kv_tokens_per_sequence"] for r in report["ranks"]])
    kvp = report["kvp"]
    for t in range(report["tpa"]):  # inside each TPA group the KVP shards stay within a block
        group = per_sequence[t * kvp:(t + 1) * kvp]
        assert torch.all(group.max(0).values - group.min(0).values <= block)
        total = torch.tensor(report["context_lengths"]) + report["decode_steps"]
        assert torch.equal(group.sum(0), total)


@pytest.mark.parametrize("kvp, tpa", [(2, 1), (1, 2), (2, 2), (4, 1)])
def test_llama_matches_single_rank(kvp, tpa):
    spec = DemoSpec(model=tiny_llama(), helix=HelixConfig(kvp=kvp, tpa=tpa, tokens_per_block=4),
                    context_lengths=LENGTHS, steps=9)
    check(run_demo(spec, timeout_s=120), 4)


@pytest.mark.parametrize("kvp, tpf, ep", [(2, 1, 2), (4, 2, 2), (2, 2, 1)])
def test_deepseek_matches_single_rank(kvp, tpf, ep):
    spec = DemoSpec(model=tiny_deepseek(), helix=HelixConfig(kvp=kvp, tpa=1, tpf=tpf, ep=ep, tokens_per_block=4),
                    context_lengths=LENGTHS, steps=9)
    check(run_demo(spec, timeout_s=120), 4)


def test_hopb_on_and_off_give_the_same_bits():
    logits = []
    for chunks in (1, 3):
        spec = DemoSpec(model=tiny_llama(), helix=HelixConfig(kvp=2, tpa=2, tokens_per_block=4, hopb_chunks=chunks),
                        context_lengths=LENGTHS, steps=5)
        logits.append(spawn(run_rank, 4, (spec,), timeout_s=120)[0]["logits"])
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_experts(fmt):
    spec = DemoSpec(model=tiny_deepseek(expert_format=fmt), helix=HelixConfig(kvp=2, tpa=1, tpf=1, ep=2,
                                                                               tokens_per_block=4, hopb_chunks=2),
                    context_lengths=LENGTHS, steps=5)
    check(run_demo(spec, timeout_s=120), 4)


def test_bf16_model():
    spec = DemoSpec(model=tiny_llama(dtype=torch.bfloat16), helix=HelixConfig(kvp=2, tpa=2, tokens_per_block=4),
                    context_lengths=LENGTHS, steps=5)
    check(run_demo(spec, timeout_s=120), 4)


def test_eight_ranks():
    spec = DemoSpec(model=tiny_llama(), helix=HelixConfig(kvp=4, tpa=2, tokens_per_block=4, hopb_chunks=2),
                    context_lengths=LENGTHS, steps=6)
    check(run_demo(spec, timeout_s=180), 4)


def test_a_dying_rank_fails_the_others_within_the_timeout():
    spec = DemoSpec(model=tiny_llama(), helix=HelixConfig(kvp=2, tpa=1, tokens_per_block=4),
                    context_lengths=LENGTHS, steps=6, die_at_step={1: 2})
    start = time.monotonic()
    results = spawn(run_rank, 2, (spec,), timeout_s=20, return_errors=True)
    elapsed = time.monotonic() - start
    assert elapsed < 80, f"the run took {elapsed:.0f} s: something waited past the collective timeout"
    assert all(isinstance(r, tuple) and r[0] == "error" for r in results), results
    assert "died" in results[1][1]  # the dead rank is reported as such
    assert "Error" in results[0][1] or "error" in results[0][1]  # the survivor failed, it did not hang


def test_demo_command_json():
    run = subprocess.run([sys.executable, "-m", "helix_ext", "demo", "--model", "llama", "--context", "100", "--steps", "5",
                          "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert report["matches_reference"] is True
    assert report["world_size"] >= 2 and report["kvp"] >= 2
    for key in ("max_abs_diff", "tpa", "tokens_per_rank"):
        assert key in report


def test_demo_command_rejects_an_invalid_config():
    run = subprocess.run([sys.executable, "-m", "helix_ext", "demo", "--model", "llama", "--kvp", "2", "--tpa", "8"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "tpa (8) must be <= the number of KV heads (4)" in run.stderr


def test_demo_command_refuses_fp4_experts_not_in_whole_blocks_before_starting_ranks():
    # 8 ranks give each TPF slice 8 of the 64 expert columns: half an nvfp4 block. Refused by the
    # config check (exit status 2, the constraint named), not by a rank's constructor.
    run = subprocess.run([sys.executable, "-m", "helix_ext", "demo", "--model", "deepseek", "--experts", "nvfp4",
                          "--kvp", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "invalid Helix config: nvfp4 experts: the FFN dim (64) is 4 blocks of 16" in run.stderr


@pytest.mark.parametrize("model", ["llama", "smollm2"])
def test_demo_command_refuses_cuda_graphs_on_cpu_ranks(model):
    # Before any rank starts (and before SmolLM2 loads): CPU ranks have no graphs to capture.
    run = subprocess.run([sys.executable, "-m", "helix_ext", "demo", "--model", model, "--kvp", "2", "--tpa", "1",
                          "--cuda-graphs", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "cuda_graphs needs ranks on GPUs with one process each (NCCL); these ranks run over 'gloo'" in run.stderr
