"""The "fused" exchange backend (HOP-B combine reading peers' buffers in place) in the
runtime: the same bits as the "nccl" backend; its failure mode; and, where GPUs allow, the
symmetric-memory path."""

import os
import time

import pytest
import torch

from helix_ext.parallel.config import HelixConfig
from helix_ext.parallel.demo import DemoSpec, run_demo, run_rank
from helix_ext.parallel.launch import spawn
from helix_ext.parallel.models import tiny_deepseek, tiny_llama

LENGTHS = [37, 20, 5, 0]


def rank0_logits(model, exchange, **helix):
    spec = DemoSpec(model=model, helix=HelixConfig(tokens_per_block=4, exchange=exchange, **helix),
                    context_lengths=LENGTHS, steps=6)
    return spawn(run_rank, spec.helix.world_size, (spec,), timeout_s=120)[0]["logits"]


@pytest.mark.parametrize("model, helix", [
    (tiny_llama(), dict(kvp=2, tpa=2, hopb_chunks=1)),
    (tiny_llama(), dict(kvp=2, tpa=2, hopb_chunks=3)),
    (tiny_deepseek(), dict(kvp=4, tpa=1, tpf=2, ep=2, hopb_chunks=2)),
    (tiny_llama(num_q_heads=12, num_kv_heads=4), dict(kvp=3, tpa=1, hopb_chunks=2)),  # 12 heads over 3 ranks
], ids=["llama-2x2", "llama-2x2-hopb3", "deepseek-kvp4-ep2", "llama-kvp3"])
def test_fused_gives_the_same_bits_as_nccl(model, helix):
    assert torch.equal(rank0_logits(model, "fused", **helix), rank0_logits(model, "nccl", **helix))


def test_the_error_flag_is_read_once_per_step_not_per_chunk():
    # Reading the device-side error flag is a host sync on GPUs: once per decode step, never
    # between chunks (the host would wait for combine(c) before enqueueing combine(c + 1)).
    steps = 5
    spec = DemoSpec(model=tiny_llama(), helix=HelixConfig(kvp=2, tpa=1, tokens_per_block=4, exchange="fused",
                                                          hopb_chunks=3), context_lengths=LENGTHS, steps=steps)
    ranks = spawn(run_rank, spec.helix.world_size, (spec,), timeout_s=120)
    layers = spec.model.num_layers
    assert layers > 1 and [r["exchange_error_checks"] for r in ranks] == [steps] * 2


def test_fused_matches_the_single_rank_reference():
    spec = DemoSpec(model=tiny_llama(), helix=HelixConfig(kvp=4, tpa=1, tokens_per_block=4, exchange="fused",
                                                          hopb_chunks=2), context_lengths=LENGTHS, steps=9)
    report = run_demo(spec, timeout_s=120)
    assert report["matches_reference"], report["max_abs_diff"]


def test_fused_with_a_dying_rank_fails_within_the_timeout():
    spec = DemoSpec(model=tiny_llama(), helix=HelixConfig(kvp=2, tpa=1, tokens_per_block=4, exchange="fused",
                                                          exchange_timeout_s=5.0),
                    context_lengths=LENGTHS, steps=6, die_at_step={1: 2})
    start = time.monotonic()
    results = spawn(run_rank, 2, (spec,), timeout_s=20, return_errors=True)
    assert time.monotonic() - start < 80
    assert results[1][0] == "error" and "died" in results[1][1]
    assert results[0][0] == "error"  # the survivor's combine (or collective) failed; it did not hang
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("helix-fused-")]  # no leaked buffers


def _symmetric_memory_worker(rank, backend, dim):
    """Two processes on GPU 0 (TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1): a FusedExchange
    round trip against merge_states."""
    import torch.distributed as dist

    import helix_ext
    from helix_ext.parallel.fused_exchange import FusedExchange

    torch.cuda.set_device(0)
    group = dist.new_group([0, 1])
    exchange = FusedExchange(group, rank, [2, 2], 8, dim, torch.bfloat16, torch.device("cuda", 0), max_chunks=3)
    g = torch.Generator(device="cuda").manual_seed(100 + rank)
    out = torch.randn(8, 4, dim, device="cuda", generator=g).bfloat16()
    lse = torch.randn(8, 4, device="cuda", generator=g)
    exchange.begin_layer()
    # Three chunks (HOP-B) with no host sync between them: the error flag is read in end_step only.
    torch.cuda.set_sync_debug_mode("error")
    try:
        handles = [exchange.start(out[rows], lse[rows]) for rows in (slice(0, 3), slice(3, 6), slice(6, 8))]
        pieces = [exchange.finish(handle) for handle in handles]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    exchange.end_step()
    assert exchange.error_checks == 1
    merged, merged_lse = torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])
    gathered = [torch.empty_like(out) for _ in range(2)]
    gathered_lse = [torch.empty_like(lse) for _ in range(2)]
    dist.all_gather(gathered, out, group=group)
    dist.all_gather(gathered_lse, lse, group=group)
    heads = slice(2 * rank, 2 * rank + 2)
    expected = helix_ext.merge_states(torch.stack([t[:, heads] for t in gathered]),
                                      torch.stack([t[:, heads] for t in gathered_lse]))
    torch.cuda.synchronize()
    return bool(torch.equal(merged, expected[0]) and torch.equal(merged_lse, expected[1]))


@pytest.mark.gpu
def test_symmetric_memory_two_processes_one_gpu(monkeypatch):
    monkeypatch.setenv("TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES", "1")
    results = spawn(_symmetric_memory_worker, 2, (128,), backend="gloo", timeout_s=60, return_errors=True)
    errors = [r[1] for r in results if isinstance(r, tuple)]
    if errors:
        pytest.skip(f"symmetric memory across two processes on one GPU did not work here: {errors[0][:300]}")
    assert all(results)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 GPUs (NCCL ranks on separate devices)")
def test_fused_on_two_gpus_matches_nccl():
    model = tiny_llama(dtype=torch.bfloat16)
    helix = dict(kvp=2, tpa=1, hopb_chunks=2)
    spec_args = dict(model=model, context_lengths=LENGTHS, steps=6)
    logits = {}
    for exchange in ("nccl", "fused"):
        spec = DemoSpec(helix=HelixConfig(tokens_per_block=4, exchange=exchange, **helix), **spec_args)
        logits[exchange] = spawn(run_rank, 2, (spec,), backend="nccl", timeout_s=120)[0]["logits"]
    assert torch.equal(logits["fused"], logits["nccl"])
