"""The GPU dry run (helix_ext.parallel.dry_run): each model's decode step on fake CUDA tensors
over a fake process group, every rank's view in turn, on a machine without a GPU. It must
finish with no host sync, every tensor on the rank's GPU, and every op's CUDA constraints met;
and it must catch each of those when broken."""

import pytest
import torch

from helix_ext.parallel.config import HelixConfig
from helix_ext.parallel.decoder import HelixDecoder
from helix_ext.parallel.dry_run import DryRunViolation, dry_run, dry_run_rank
from helix_ext.parallel.hf_model import smollm2_shape
from helix_ext.parallel.models import tiny_deepseek, tiny_llama

LENGTHS = [37, 20, 5, 0]


@pytest.mark.parametrize("model, helix", [
    (tiny_llama(dtype=torch.bfloat16), HelixConfig(kvp=2, tpa=2, tokens_per_block=4, hopb_chunks=1)),
    (tiny_llama(dtype=torch.bfloat16), HelixConfig(kvp=2, tpa=2, tokens_per_block=4, hopb_chunks=3)),
    (tiny_deepseek(dtype=torch.bfloat16, expert_format="nvfp4"),
     HelixConfig(kvp=4, tpa=1, tpf=2, ep=2, tokens_per_block=4, hopb_chunks=2)),
    (tiny_deepseek(dtype=torch.bfloat16), HelixConfig(kvp=2, tpa=1, tpf=1, ep=2, tokens_per_block=4)),
    (tiny_llama(dtype=torch.bfloat16), HelixConfig(kvp=2, tpa=2, tokens_per_block=4, hopb_chunks=3, exchange="fused")),
    (tiny_deepseek(dtype=torch.bfloat16, expert_format="nvfp4"),
     HelixConfig(kvp=4, tpa=1, tpf=2, ep=2, tokens_per_block=4, hopb_chunks=2, exchange="fused")),
], ids=["llama-2x2", "llama-2x2-hopb3", "deepseek-nvfp4-kvp4-ep2", "deepseek-dense-ep2", "llama-2x2-hopb3-fused",
        "deepseek-nvfp4-kvp4-ep2-fused"])
def test_every_rank_decodes_on_the_gpu_path(model, helix):
    steps = 3
    reports = dry_run(model, helix, LENGTHS, steps=steps)  # crosses block owners (blocks of 4)
    assert [r.rank for r in reports] == list(range(helix.world_size))
    for report in reports:
        calls = report.device_calls
        assert report.ops_per_step > 50  # the step really ran, on fake CUDA tensors
        # Events are recorded (phase timers; HOP-B's combine stream), nothing waits for the device.
        assert calls.get("event.synchronize", 0) == 0 and calls["event.record"] > 0
        if helix.exchange == "fused":
            # One look at the combines' error flag per step, none per chunk; each chunk's
            # combine on the side stream, after the compute stream's event.
            assert calls["read_flag"] == steps
            assert calls["stream.wait_event"] == steps * model.num_layers * helix.hopb_chunks
        else:
            assert "read_flag" not in calls


@pytest.mark.parametrize("model, helix", [
    (tiny_llama(dtype=torch.bfloat16), HelixConfig(kvp=2, tpa=2, tokens_per_block=4, hopb_chunks=2)),
    (tiny_llama(dtype=torch.bfloat16), HelixConfig(kvp=2, tpa=2, tokens_per_block=4, exchange="fused")),
    (tiny_deepseek(dtype=torch.bfloat16, expert_format="nvfp4"),
     HelixConfig(kvp=4, tpa=1, tpf=2, ep=2, tokens_per_block=4, hopb_chunks=2)),
    (tiny_llama(dtype=torch.bfloat16), HelixConfig(kvp=2, tpa=2, tokens_per_block=4, cuda_graphs=True)),
], ids=["llama-2x2-hopb2", "llama-2x2-fused", "deepseek-mla-nvfp4-kvp4", "llama-2x2-graphs"])
def test_speculative_steps_on_the_gpu_path(model, helix):
    # Steps of 4 tokens per sequence (the last accepted one and 3 drafts; blocks of 4, so each
    # step crosses an owner) with rollbacks between them: flash_decode's Q = 4 path and
    # query_key_lens on fake CUDA tensors, no host sync inside a step; with cuda_graphs the
    # rollbacks change only tensors the graph reads.
    reports = dry_run(model, helix, LENGTHS, steps=4, step_tokens=4)
    assert all(r.ops_per_step > 50 for r in reports)


@pytest.mark.parametrize("ffn_format, helix", [
    ("none", HelixConfig(kvp=2, tpa=3, tokens_per_block=16, hopb_chunks=2)),  # the main job's default layout
    ("nvfp4", HelixConfig(kvp=2, tpa=3, tokens_per_block=16, hopb_chunks=2, exchange="fused")),
    ("mxfp4", HelixConfig(kvp=8, tpa=1, tokens_per_block=16)),
], ids=["bf16-2x3", "nvfp4-2x3-fused", "mxfp4-8x1"])
def test_smollm2_decodes_on_the_gpu_path(ffn_format, helix):
    # The main job's model in bf16 (30 layers, 9 query / 3 KV heads of 64, FFN 1536), seeded
    # weights in its exact shapes (fake tensors: nothing is allocated), one rank of each role.
    model = smollm2_shape(ffn_format)
    for rank in sorted({0, helix.world_size - 1}):  # the first KVP rank of the first TPA group, the last rank
        report = dry_run_rank(model, helix, rank, [403, 130], steps=2)
        assert report.ops_per_step > 30 * 20


def test_head_dims_the_cuda_kernel_lacks_fail_as_on_a_gpu():
    # The tiny llama's former head dim (32): the fake flash_decode checks what the CUDA one does.
    with pytest.raises(RuntimeError, match=r"the CUDA kernel supports \(Dk, Dv\) = \(64, 64\)"):
        dry_run_rank(tiny_llama(dtype=torch.bfloat16, head_dim=32), HelixConfig(kvp=2, tpa=2, tokens_per_block=4),
                     0, LENGTHS)


def test_float32_fails_as_on_a_gpu():
    with pytest.raises(RuntimeError, match=r"float32 runs on the CPU only"):
        dry_run_rank(tiny_llama(), HelixConfig(kvp=2, tpa=2, tokens_per_block=4), 1, LENGTHS)


def test_a_host_sync_inside_a_step_is_caught(monkeypatch):
    original = HelixDecoder._ffn

    def ffn_reading_a_value(self, layer, x):
        if float(x.abs().max()) > 1e30:  # a host read of device data
            pass
        return original(self, layer, x)

    monkeypatch.setattr(HelixDecoder, "_ffn", ffn_reading_a_value)
    with pytest.raises(DryRunViolation, match=r"a host read of a device value"):
        dry_run_rank(tiny_llama(dtype=torch.bfloat16), HelixConfig(kvp=2, tpa=2, tokens_per_block=4), 0, LENGTHS)


def test_a_host_to_device_copy_inside_a_step_is_caught(monkeypatch):
    # What step() did before: positions built on the host and copied every step.
    original = HelixDecoder._attention

    def attention_with_host_positions(self, layer, x, positions, slots, rope):
        host_positions = torch.tensor([0] * x.shape[0], device=self.device)
        return original(self, layer, x, positions + host_positions, slots, rope)

    monkeypatch.setattr(HelixDecoder, "_attention", attention_with_host_positions)
    with pytest.raises(DryRunViolation, match=r"on cpu inside a decode step"):
        dry_run_rank(tiny_llama(dtype=torch.bfloat16), HelixConfig(kvp=2, tpa=2, tokens_per_block=4), 0, LENGTHS)


# ---------------------------------------------------------------------------- CUDA graphs
GRAPH_STEPS = 5  # an eager step, the capture, replays; position 40 starts a block of the other KVP rank


@pytest.mark.parametrize("model, helix", [
    (tiny_llama(dtype=torch.bfloat16), HelixConfig(kvp=2, tpa=2, tokens_per_block=4, hopb_chunks=3, cuda_graphs=True)),
    (tiny_llama(dtype=torch.bfloat16),
     HelixConfig(kvp=2, tpa=2, tokens_per_block=4, hopb_chunks=2, exchange="fused", cuda_graphs=True)),
    (tiny_deepseek(dtype=torch.bfloat16, expert_format="nvfp4"),
     HelixConfig(kvp=4, tpa=1, tpf=2, ep=2, tokens_per_block=4, hopb_chunks=2, exchange="fused", cuda_graphs=True)),
], ids=["llama-2x2-hopb3", "llama-2x2-fused", "deepseek-nvfp4-kvp4-ep2-fused"])
def test_the_step_is_captured_once_and_every_replay_is_the_captured_step(model, helix):
    for report in dry_run(model, helix, LENGTHS, steps=GRAPH_STEPS):
        calls = report.device_calls
        assert calls["capture"] == 1 and calls["replay"] == GRAPH_STEPS - 1
        assert calls.get("event.synchronize", 0) == 0
        if helix.exchange == "fused":
            assert calls["read_flag"] == GRAPH_STEPS  # still once per step, after each replay


def test_smollm2_step_is_capturable():
    helix = HelixConfig(kvp=2, tpa=3, tokens_per_block=16, hopb_chunks=2, exchange="fused", cuda_graphs=True)
    report = dry_run_rank(smollm2_shape(), helix, 4, [403, 130], steps=3)
    assert report.device_calls["capture"] == 1 and report.device_calls["replay"] == 2


def test_a_host_value_in_the_captured_step_is_caught(monkeypatch):
    # A kernel argument computed from host state that changes every step (the next position):
    # a graph would replay the value it captured.
    from helix_ext.parallel.kv_cache import HelixKVCache

    original = HelixKVCache.step_slots

    def slots_with_a_host_value(self, count=1):
        slots = original(self, count)
        slots.offset = slots.offset + torch.full_like(slots.offset, self._next_positions[0]) * 0  # adds 0
        return slots

    monkeypatch.setattr(HelixKVCache, "step_slots", slots_with_a_host_value)
    helix = HelixConfig(kvp=2, tpa=2, tokens_per_block=4, cuda_graphs=True)
    with pytest.raises(DryRunViolation, match=r"a replay of the captured step would differ"):
        dry_run_rank(tiny_llama(dtype=torch.bfloat16), helix, 0, LENGTHS, steps=4)
    # The same step without graphs is fine: eager steps may differ from one another.
    dry_run_rank(tiny_llama(dtype=torch.bfloat16), HelixConfig(kvp=2, tpa=2, tokens_per_block=4), 0, LENGTHS, steps=4)


def test_a_tensor_rebound_every_step_is_caught(monkeypatch):
    # positions advanced out of place: each step reads a new tensor the previous one made, and
    # a graph would keep reading the one it captured.
    from helix_ext.parallel.kv_cache import HelixKVCache, StepSlots

    def slots_rebinding_positions(self, count=1):
        step_positions = self.positions
        self.positions = self.positions + 1
        return StepSlots(torch.zeros_like(step_positions), torch.remainder(step_positions, self.block_size),
                         step_positions)

    monkeypatch.setattr(HelixKVCache, "step_slots", slots_rebinding_positions)
    helix = HelixConfig(kvp=2, tpa=2, tokens_per_block=4, cuda_graphs=True)
    with pytest.raises(DryRunViolation, match=r"a replay of the captured step would differ"):
        dry_run_rank(tiny_llama(dtype=torch.bfloat16), helix, 0, LENGTHS, steps=4)


def test_cuda_graphs_need_gpu_ranks():
    helix = HelixConfig(kvp=2, tpa=2, tokens_per_block=4, cuda_graphs=True)
    with pytest.raises(ValueError, match=r"cuda_graphs needs ranks on GPUs"):
        dry_run_rank(tiny_llama(), helix, 0, LENGTHS, steps=3, device=torch.device("cpu"))


def test_graphs_need_a_replay_after_the_capture_to_check():
    with pytest.raises(ValueError, match=r"a dry run with cuda_graphs needs steps >= 3"):
        dry_run_rank(tiny_llama(dtype=torch.bfloat16), HelixConfig(kvp=2, tpa=2, cuda_graphs=True), 0, LENGTHS, steps=2)


def test_a_stalled_replay_fails_the_step_instead_of_hanging(monkeypatch):
    # Captured collectives are outside NCCL's watchdog: the host's own bounded wait must fail.
    from helix_ext.parallel.device import DryRuntime

    monkeypatch.setattr(DryRuntime, "wait_event", lambda self, event, timeout_s: False)
    helix = HelixConfig(kvp=2, tpa=2, tokens_per_block=4, cuda_graphs=True, exchange_timeout_s=5.0)
    with pytest.raises(RuntimeError, match=r"a replayed decode step did not finish within 5.0 s"):
        dry_run_rank(tiny_llama(dtype=torch.bfloat16), helix, 0, LENGTHS, steps=5)


@pytest.mark.parametrize("broken", ["wait_event", "wait_stream"])
def test_a_side_stream_outside_the_capture_is_caught(monkeypatch, broken):
    # The fused exchange's combine stream must join the capture (wait on an event of the
    # capturing stream) before its work, and the capturing stream must wait on it after: with
    # either wait left out, a real capture fails, and so does the dry run's.
    from helix_ext.parallel.device import _InertStream

    monkeypatch.setattr(_InertStream, broken, lambda self, other: None)
    helix = HelixConfig(kvp=2, tpa=2, tokens_per_block=4, exchange="fused", cuda_graphs=True)
    expected = r"has not joined the capture" if broken == "wait_event" else r"still joined to the capture when it ended"
    with pytest.raises(DryRunViolation, match=expected):
        dry_run_rank(tiny_llama(dtype=torch.bfloat16), helix, 0, LENGTHS, steps=3)
