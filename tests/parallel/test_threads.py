"""In-process ranks (launch.spawn_threads, `--device threads`): every rank a thread over torch's
thread-based process group, all on GPU 0 when there is one, so one GPU runs the whole
multi-rank GPU path. On the CPU they must give what spawned processes give."""

import pytest
import torch

from helix_ext.parallel.config import HelixConfig
from helix_ext.parallel.demo import DemoSpec, run_demo, run_rank
from helix_ext.parallel.launch import RankFailure, spawn
from helix_ext.parallel.models import tiny_deepseek, tiny_llama

LENGTHS = [37, 20, 5, 0]


def logits(model, device="threads", steps=6, **helix):
    spec = DemoSpec(model=model, helix=HelixConfig(tokens_per_block=4, **helix), context_lengths=LENGTHS, steps=steps)
    return spawn(run_rank, spec.helix.world_size, (spec,), timeout_s=120, device=device)[0]["logits"]


@pytest.mark.parametrize("model, helix", [
    (tiny_llama(), dict(kvp=2, tpa=2, hopb_chunks=2)),
    (tiny_deepseek(), dict(kvp=2, tpa=1, tpf=1, ep=2)),
], ids=["llama-2x2-hopb", "deepseek-ep2"])
def test_threads_reproduce_the_single_rank_model(model, helix):
    # As spawned processes do (fp32: tokens identical, logits within 1e-5). Not bit for bit with
    # processes: the threads share the intra-op thread pool, so matmuls block differently.
    spec = DemoSpec(model=model, helix=HelixConfig(tokens_per_block=4, **helix), context_lengths=LENGTHS, steps=6)
    report = run_demo(spec, timeout_s=120, device="threads")
    assert report["matches_reference"], report["max_abs_diff"]
    assert all(r["device"] == "cpu" for r in report["ranks"])


@pytest.mark.parametrize("model, helix", [
    (tiny_llama(), dict(kvp=2, tpa=2)),
    (tiny_deepseek(expert_format="nvfp4"), dict(kvp=4, tpa=1, tpf=2, ep=2)),
], ids=["llama-2x2", "deepseek-nvfp4-kvp4-ep2"])
def test_fused_equals_nccl_and_hopb_changes_no_bit(model, helix):
    runs = {(exchange, chunks): logits(model, exchange=exchange, hopb_chunks=chunks, **helix)
            for exchange in ("nccl", "fused") for chunks in (1, 3)}
    first = runs[("nccl", 1)]
    assert all(torch.equal(first, other) for other in runs.values())


def test_a_failing_rank_fails_the_run_instead_of_hanging():
    spec = DemoSpec(model=tiny_llama(), helix=HelixConfig(kvp=2, tpa=1, tokens_per_block=4), context_lengths=LENGTHS,
                    steps=3)

    def failing(rank, backend, spec):
        if rank == 1:
            raise ValueError("rank 1 gives up")
        return run_rank(rank, backend, spec)

    with pytest.raises(RankFailure, match="rank 1 gives up"):
        spawn(failing, 2, (spec,), timeout_s=30, device="threads")


@pytest.mark.gpu
@pytest.mark.parametrize("model, helix", [
    (tiny_llama(dtype=torch.bfloat16), dict(kvp=2, tpa=2, hopb_chunks=2, exchange="nccl")),
    (tiny_llama(dtype=torch.bfloat16), dict(kvp=2, tpa=2, hopb_chunks=2, exchange="fused")),
    (tiny_llama(dtype=torch.bfloat16), dict(kvp=4, tpa=1, hopb_chunks=1, exchange="fused")),
    (tiny_deepseek(dtype=torch.bfloat16, expert_format="nvfp4"), dict(kvp=4, tpa=1, tpf=2, ep=2, hopb_chunks=2,
                                                                      exchange="fused")),
], ids=["llama-nccl-hopb", "llama-fused-hopb", "llama-fused-kvp4", "deepseek-nvfp4-fused"])
def test_one_gpu_runs_every_rank_with_the_cuda_kernels(model, helix):
    spec = DemoSpec(model=model, helix=HelixConfig(tokens_per_block=4, **helix), context_lengths=LENGTHS, steps=6)
    report = run_demo(spec, timeout_s=120, device="threads")
    assert all(r["device"] == "cuda:0" for r in report["ranks"]), report["ranks"]
    assert report["matches_reference"], report["max_abs_diff"]



@pytest.mark.gpu
@pytest.mark.parametrize("exchange", ["nccl", "fused"])
def test_a_cuda_graph_replays_the_eager_step_bit_for_bit(exchange):
    # One NCCL rank on the GPU (threads cannot capture: their collectives run on the host): the
    # step captured at step 2 and replayed must give the eager steps' bits.
    model = tiny_llama(dtype=torch.bfloat16)
    eager = logits(model, "cuda", kvp=1, tpa=1, hopb_chunks=2, exchange=exchange)
    graphed = logits(model, "cuda", kvp=1, tpa=1, hopb_chunks=2, exchange=exchange, cuda_graphs=True)
    assert torch.isfinite(eager).all() and torch.equal(eager, graphed)
