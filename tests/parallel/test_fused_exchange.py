"""The "fused" exchange backend (HOP-B combine and the TP all-reduces reading peers' buffers in
place) in the runtime: agreement with the "nccl" backend; its failure mode; and, where GPUs
allow, the symmetric-memory path."""

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
def test_fused_agrees_with_nccl(model, helix):
    # The combine gives merge_states' bits (tests/test_hopb_combine.py); the all-reduces sum in
    # rank order where gloo's ring sums in its own: the logits agree to fp32 rounding.
    torch.testing.assert_close(rank0_logits(model, "fused", **helix), rank0_logits(model, "nccl", **helix),
                               rtol=1e-5, atol=1e-5)


def _peer_all_reduce_worker(rank, backend, calls):
    import torch.distributed as dist

    from helix_ext.parallel.fused_exchange import PeerAllReduce

    world = dist.get_world_size()
    reduce = PeerAllReduce(dist.group.WORLD, rank, world, 3 * 40, torch.float32, torch.device("cpu"), 10.0,
                           torch.zeros(1, dtype=torch.int32))
    inputs, outputs = [], []
    for call in range(calls):
        shape = (1 + call % 3, 40 - call)  # shapes change between calls; the slots alternate
        y = torch.randn(shape, generator=torch.Generator().manual_seed(1000 * call + rank)) * 10
        inputs.append(y)
        outputs.append(reduce(y.clone()))
    reduce.end_step()  # an even number of calls
    odd = PeerAllReduce(dist.group.WORLD, rank, world, 8, torch.float32, torch.device("cpu"), 10.0,
                        torch.zeros(1, dtype=torch.int32))
    odd(torch.ones(8))
    try:
        odd.end_step()
        odd_refused = False
    except RuntimeError as error:
        odd_refused = "even number of all-reduces" in str(error)
    return inputs, outputs, odd_refused


@pytest.mark.parametrize("device", ["cpu", "threads"])
def test_peer_all_reduce_gives_every_rank_the_sum_in_the_same_bits(device):
    # 3 ranks (processes over shared memory, or threads), 12 calls back to back through the two
    # slots, no other synchronization between them: a slot reused too early would show here.
    ranks = spawn(_peer_all_reduce_worker, 3, (12,), device=device, timeout_s=60)
    for call in range(12):
        outputs = [r[1][call] for r in ranks]
        exact = sum(r[0][call].double() for r in ranks)
        assert all(torch.equal(outputs[0], out) for out in outputs[1:])  # every rank: the same bits
        torch.testing.assert_close(outputs[0].double(), exact, rtol=1e-6, atol=1e-5)
    assert all(r[2] for r in ranks)


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
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("helix-peer-")]  # no leaked buffers


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
    # The TP all-reduce over the same symmetric memory: two calls (both slots), then the check.
    from helix_ext.parallel.fused_exchange import PeerAllReduce
    from helix_ext.reference import hopb_all_reduce_reference

    reduce = PeerAllReduce(dist.group.WORLD, rank, 2, 2 * 96, torch.bfloat16, torch.device("cuda", 0), 10.0,
                           exchange.error[1:])
    ys = [torch.randn(2, 96, device="cuda", generator=g).bfloat16() for _ in range(2)]
    sums = [reduce(y) for y in ys]
    reduce.end_step()
    exchange.end_step()
    summed_right = True
    for y, total in zip(ys, sums):
        parts = [torch.empty_like(y) for _ in range(2)]
        dist.all_gather(parts, y)
        summed_right &= torch.equal(total, hopb_all_reduce_reference(parts, compute_dtype=torch.float32))
    torch.cuda.synchronize()
    return bool(torch.equal(merged, expected[0]) and torch.equal(merged_lse, expected[1]) and summed_right)


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
    # The same combine bits; the all-reduces' sum order may differ from NCCL's: bf16 rounding.
    torch.testing.assert_close(logits["fused"], logits["nccl"], rtol=2e-2, atol=2e-2)
