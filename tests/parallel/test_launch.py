"""Rank set-up (helix_ext.parallel.launch) without GPUs: the backend choice, the device of a
rank, and the order and arguments of the process-group start, with torch's CUDA and
distributed entry points replaced by recorders."""

import datetime
import time

import pytest
import torch
import torch.distributed as dist

from helix_ext.parallel import launch


def fake_gpus(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("gpus, ranks, device, expected", [
    (0, 4, None, "gloo"), (0, 4, "cpu", "gloo"), (8, 8, None, "nccl"), (8, 4, "cuda", "nccl"),
    (1, 4, "cpu", "gloo"), (1, 1, None, "nccl"),
])
def test_backend_choice(monkeypatch, gpus, ranks, device, expected):
    monkeypatch.delenv("HELIX_RANK_DEVICE", raising=False)
    fake_gpus(monkeypatch, gpus)
    assert launch.choose_backend(ranks, device) == expected


@pytest.mark.parametrize("gpus, device", [(1, None), (4, "auto"), (0, "cuda")])
def test_fewer_gpus_than_ranks_is_an_error_not_a_cpu_fallback(monkeypatch, gpus, device):
    monkeypatch.delenv("HELIX_RANK_DEVICE", raising=False)
    fake_gpus(monkeypatch, gpus)
    with pytest.raises(launch.RankSetupError, match=rf"8 ranks on this machine need one GPU each, but it has {gpus}"):
        launch.choose_backend(8, device)


def test_the_environment_can_ask_for_the_cpu(monkeypatch):
    fake_gpus(monkeypatch, 1)
    monkeypatch.setenv("HELIX_RANK_DEVICE", "cpu")
    assert launch.choose_backend(8) == "gloo"


class Recorder:
    def __init__(self, monkeypatch, gpus=8):
        self.calls = []
        fake_gpus(monkeypatch, gpus)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: self.calls.append(("set_device", device)))
        monkeypatch.setattr(dist, "init_process_group",
                            lambda backend, **kwargs: self.calls.append(("init_process_group", backend, kwargs)))
        monkeypatch.setattr(dist, "gather_object", lambda obj, gathered, dst: gathered.__setitem__(0, obj)
                            if gathered is not None else None)
        monkeypatch.setattr(dist, "destroy_process_group", lambda: self.calls.append(("destroy",)))


def test_torchrun_rank_uses_local_rank_sets_the_device_first_and_honours_the_timeout(monkeypatch):
    # Rank 13 of a 16-rank, two-node launch is local rank 5 of its node: GPU 5 (not 13 % 8 by
    # accident of the count), made current before the process group starts, which gets it as
    # device_id and the user's timeout.
    recorder = Recorder(monkeypatch)
    monkeypatch.setenv("RANK", "13")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.delenv("HELIX_RANK_DEVICE", raising=False)
    seen = []
    launch.run_under_torchrun(lambda rank, backend: seen.append((rank, backend)), 16, timeout_s=1234.0)
    assert seen == [(13, "nccl")]
    assert recorder.calls[0] == ("set_device", torch.device("cuda", 5))
    name, backend, kwargs = recorder.calls[1]
    assert name == "init_process_group" and backend == "nccl"
    assert kwargs["device_id"] == torch.device("cuda", 5) and kwargs["rank"] == 13 and kwargs["world_size"] == 16
    assert kwargs["timeout"] == datetime.timedelta(seconds=1234.0)


def test_torchrun_on_the_cpu_gets_the_timeout_too(monkeypatch):
    recorder = Recorder(monkeypatch, gpus=0)
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "x"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    launch.run_under_torchrun(lambda rank, backend: None, 2, timeout_s=77.0)
    name, backend, kwargs = recorder.calls[0]
    assert (name, backend) == ("init_process_group", "gloo") and "device_id" not in kwargs
    assert kwargs["timeout"] == datetime.timedelta(seconds=77.0)


def test_a_local_rank_without_a_gpu_is_an_error(monkeypatch):
    Recorder(monkeypatch, gpus=2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(launch.RankSetupError, match=r"local rank 3 has no GPU of its own \(2 visible\)"):
        launch.rank_device("nccl", 3)


class FakeEvent:
    clock = 0.0
    log = []

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.time = None

    def record(self, stream=None):
        FakeEvent.clock += 1.0
        self.time = FakeEvent.clock
        FakeEvent.log.append("record")

    def synchronize(self):
        FakeEvent.log.append("event sync")

    def elapsed_time(self, end):
        return (end.time - self.time) * 1000.0  # milliseconds


def test_gpu_phase_timers_record_events_and_never_synchronize_inside_a_step(monkeypatch):
    # On GPUs a phase is timed by CUDA events on the stream; torch.cuda.synchronize inside a
    # step would serialize HOP-B's chunks. The events are read only when the times are.
    from helix_ext.parallel.decoder import PhaseTimers

    def no_sync(*args, **kwargs):
        raise AssertionError("a device-wide synchronize inside a step")

    monkeypatch.setattr(torch.cuda, "synchronize", no_sync)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)  # what the device layer's CudaRuntime makes
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    FakeEvent.clock, FakeEvent.log = 0.0, []
    timers = PhaseTimers(torch.device("cuda", 0))
    for _ in range(3):
        with timers.phase("attention"):
            FakeEvent.clock += 2.0
        with timers.phase("exchange"):
            FakeEvent.clock += 0.5
    assert "event sync" not in FakeEvent.log and FakeEvent.log.count("record") == 12
    seconds = timers.seconds
    assert seconds == pytest.approx({"attention": 3 * 3.0, "exchange": 3 * 1.5})
    assert timers.seconds == seconds  # read once; a second read adds nothing


def test_gpu_phase_timers_record_nothing_while_a_graph_is_captured(monkeypatch):
    # Inside a capture an event would become part of the graph and its time meaningless: the
    # decoder times each replay whole instead (phase "graph").
    from helix_ext.parallel.decoder import PhaseTimers

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    FakeEvent.clock, FakeEvent.log = 0.0, []
    timers = PhaseTimers(torch.device("cuda", 0))
    with timers.phase("attention"):
        FakeEvent.clock += 2.0
    assert FakeEvent.log == [] and timers.seconds == {}


def test_threads_are_refused_under_torchrun(monkeypatch):
    Recorder(monkeypatch, gpus=1)
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "x"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    with pytest.raises(launch.RankSetupError, match=r"threads run every rank in one process: not under torchrun"):
        launch.run_under_torchrun(lambda rank, backend: None, 2, device="threads")


@pytest.mark.parametrize("gpus, device, expected", [
    (6, None, ("nccl", torch.bfloat16, torch.device("cuda", 0))),     # GPUs: NCCL ranks, bf16, reference on GPU 0
    (0, None, ("gloo", torch.float32, torch.device("cpu"))),          # none: the CPU in fp32, as before
    (6, "cpu", ("gloo", torch.float32, torch.device("cpu"))),         # asked for the CPU
])
def test_the_main_job_runs_its_ranks_where_the_machine_allows(monkeypatch, gpus, device, expected):
    # The SmolLM2 job used gloo and the CPU even on a GPU machine. Recorded, not run: the
    # backend spawn gets, and the dtype and device the reference and ranks are prepared in.
    from helix_ext.parallel import model_demo
    from helix_ext.parallel.config import HelixConfig

    fake_gpus(monkeypatch, gpus)
    monkeypatch.delenv("HELIX_RANK_DEVICE", raising=False)
    seen = {}

    def prepare(prompt, max_new_tokens, ffn_format, helix, verbose, dtype, reference_device, speculate):
        seen.update(dtype=dtype, reference_device=reference_device, speculate=speculate)
        return "run", "context"

    def spawn(fn, world_size, args, backend, timeout_s):
        seen.update(backend=backend, world_size=world_size)
        return ["ranks"]

    monkeypatch.setattr(model_demo, "prepare", prepare)
    monkeypatch.setattr(model_demo, "spawn", spawn)
    monkeypatch.setattr(model_demo, "compare", lambda run, context, ranks, seconds: "report")
    helix = HelixConfig(kvp=2, tpa=3)
    assert model_demo.run_model_demo(None, 4, "none", helix, device=device) == "report"
    assert (seen["backend"], seen["dtype"], seen["reference_device"]) == expected and seen["world_size"] == 6
    assert seen["speculate"] == 0


def test_the_host_waits_for_an_event_within_its_deadline_only():
    # What bounds the host's wait for a replayed CUDA graph (or the fused exchange's flag read):
    # polling, never a blocking synchronize that a stuck collective would hang forever.
    from helix_ext.parallel.device import CudaRuntime

    class Event:
        def __init__(self, done_after):
            self.queries, self.done_after = 0, done_after

        def query(self):
            self.queries += 1
            return self.queries > self.done_after

        def synchronize(self):
            raise AssertionError("a blocking wait")

    assert CudaRuntime().wait_event(Event(3), timeout_s=5.0) is True
    stuck = Event(10 ** 9)
    started = time.monotonic()
    assert CudaRuntime().wait_event(stuck, timeout_s=0.05) is False
    assert 0.05 <= time.monotonic() - started < 2.0 and stuck.queries > 1


def test_helix_groups_wait_no_longer_than_the_ranks_timeout(monkeypatch):
    # dist.new_group does not inherit the world's timeout (torch's default is 30 minutes): a
    # threaded rank left waiting in a group's store barrier for a failed peer outlived the run
    # and aborted the interpreter at exit (a daemon thread in C++ at finalization).
    from helix_ext.parallel.config import HelixConfig
    from helix_ext.parallel.decoder import HelixGroups

    Recorder(monkeypatch, gpus=0)
    made = []
    monkeypatch.setattr(dist, "new_group", lambda ranks, **kwargs: made.append((ranks, kwargs)))
    monkeypatch.setattr(launch, "_TIMEOUT", [None])
    launch.start_process_group("gloo", 0, 4, 77.0)
    HelixGroups(HelixConfig(kvp=2, tpa=2), 0)
    assert made == [([0, 1], {"timeout": datetime.timedelta(seconds=77.0)}),
                    ([2, 3], {"timeout": datetime.timedelta(seconds=77.0)})]
