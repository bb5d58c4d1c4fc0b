"""The few device-runtime calls the decode step makes, behind one small layer.

Streams, events and the graph-capture state are all the runtime asks of the CUDA runtime
directly (kernels and collectives go through torch ops). They go through `runtime()`: torch.cuda
on a machine with GPUs, and in the GPU dry run (helix_ext.parallel.dry_run), which has fake CUDA
tensors but no GPU, an inert stand-in that records what was asked. CPU ranks never call it.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch


class CudaRuntime:
    """torch.cuda's streams and events."""

    def new_stream(self, device: torch.device):
        return torch.cuda.Stream(device)

    def new_event(self, timing: bool = False):
        return torch.cuda.Event(enable_timing=timing)

    def current_stream(self, device: torch.device):
        return torch.cuda.current_stream(device)

    def use_stream(self, stream):
        return torch.cuda.stream(stream)

    def capturing(self) -> bool:
        return torch.cuda.is_current_stream_capturing()

    def capture(self, fn):
        """(a CUDA graph of fn's device work, fn's outputs: the graph's static outputs, which
        every replay() rewrites). Errors are per thread (other threads may be in CUDA calls)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = fn()
        return graph, outputs

    def record_stream(self, tensor: torch.Tensor, stream) -> None:
        tensor.record_stream(stream)

    def read_flag(self, flag: torch.Tensor) -> int:
        """The host's one look at a device-side flag (a sync on GPUs: once per step at most)."""
        return int(flag.item())

    def symmetric_buffers(self, nbytes: int, group, me: int, peers: int, device: torch.device):
        """(a zeroed buffer of nbytes per peer of `group`, addressable by all, mine at index `me`;
        the handle that keeps the peer mapping alive: the caller holds it). Torch symmetric
        memory: peer mapping over NVLink."""
        import torch.distributed._symmetric_memory as symm_mem

        local = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        local.zero_()
        handle = symm_mem.rendezvous(local, group)
        handle.barrier()
        return [local if peer == me else handle.get_remote_tensor(peer, (nbytes,), torch.uint8)
                for peer in range(peers)], handle


class _InertEvent:
    def __init__(self, calls: Counter):
        self._calls = calls

    def record(self, stream=None):
        self._calls["event.record"] += 1

    def wait(self, stream=None):
        self._calls["event.wait"] += 1

    def synchronize(self):
        self._calls["event.synchronize"] += 1

    def elapsed_time(self, end) -> float:
        return 0.0


class _InertStream:
    def __init__(self, calls: Counter):
        self._calls = calls

    def wait_event(self, event):
        self._calls["stream.wait_event"] += 1

    def wait_stream(self, stream):
        self._calls["stream.wait_stream"] += 1


class _DryGraph:
    """A captured step in the dry run: replay() runs the captured function again, traced, and
    its trace must be the captured one op for op (same ops, shapes, strides, dtypes, Python
    arguments, and the same tensors from outside the step): what a CUDA graph would replay is
    then exactly what the step at this point would have done."""

    def __init__(self, layer: "DryRuntime", fn, trace: list):
        self.layer, self.fn, self.trace = layer, fn, trace

    def replay(self) -> None:
        self.layer.calls["replay"] += 1
        trace, _ = self.layer.traced_capture(self.fn)
        if trace != self.trace:
            at = next((i for i, (a, b) in enumerate(zip(trace, self.trace)) if a != b), min(len(trace), len(self.trace)))
            raise self.layer.violation(
                f"a replay of the captured step would differ from this step ({len(self.trace)} ops captured, "
                f"{len(trace)} now): op {at} was {self.trace[at] if at < len(self.trace) else None}, is now "
                f"{trace[at] if at < len(trace) else None} (a host value or a fresh tensor reached the step)")


class DryRuntime:
    """The dry run's stand-in: streams and events that do nothing but count their uses (no GPU
    is there to run them); `calls` tells a test what the step asked for. Graph capture needs a
    tracer (the dry run's StepChecker): a capture records the function's op trace, each replay
    re-runs it and compares."""

    def __init__(self, tracer=None, violation=AssertionError):
        self.calls: Counter = Counter()
        self.tracer, self.violation = tracer, violation
        self._capturing = False

    def traced_capture(self, fn):
        if self.tracer is None:
            raise RuntimeError("DryRuntime: graph capture needs a tracer (the dry run's StepChecker)")
        self._capturing = True
        try:
            return self.tracer.trace(fn)
        finally:
            self._capturing = False

    def capture(self, fn):
        self.calls["capture"] += 1
        trace, outputs = self.traced_capture(fn)
        return _DryGraph(self, fn, trace), outputs

    def new_stream(self, device: torch.device):
        self.calls["new_stream"] += 1
        return _InertStream(self.calls)

    def new_event(self, timing: bool = False):
        self.calls["new_event"] += 1
        return _InertEvent(self.calls)

    def current_stream(self, device: torch.device):
        return _InertStream(self.calls)

    def use_stream(self, stream):
        self.calls["use_stream"] += 1
        return contextlib.nullcontext()

    def capturing(self) -> bool:
        return self._capturing

    def record_stream(self, tensor: torch.Tensor, stream) -> None:
        self.calls["record_stream"] += 1

    def read_flag(self, flag: torch.Tensor) -> int:
        self.calls["read_flag"] += 1  # a fake tensor has no value: count the look, report no error
        return 0

    def symmetric_buffers(self, nbytes: int, group, me: int, peers: int, device: torch.device):
        self.calls["symmetric_buffers"] += 1
        return [torch.zeros(nbytes, dtype=torch.uint8, device=device) for _ in range(peers)], None


_CURRENT: list = [CudaRuntime()]


def runtime():
    """The device layer in use: torch.cuda, unless a dry run stands in for it."""
    return _CURRENT[-1]


@contextlib.contextmanager
def use_runtime(layer):
    """Use `layer` (e.g. a DryRuntime) for streams and events inside the block."""
    _CURRENT.append(layer)
    try:
        yield layer
    finally:
        _CURRENT.pop()
