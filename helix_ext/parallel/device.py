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

    def capture(self, fn, stream):
        """(a CUDA graph of fn's device work captured on `stream`, fn's outputs: the graph's
        static outputs, which every replay() rewrites). Errors are per thread (other threads,
        e.g. NCCL's watchdog, may be in CUDA calls meanwhile)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            outputs = fn()
        return graph, outputs

    def wait_event(self, event, timeout_s: float) -> bool:
        """Wait on the host until `event` completes or `timeout_s` passes (polling, so a stuck
        device cannot hang the host); whether it completed."""
        import time

        deadline = time.monotonic() + timeout_s
        pause = 1e-5
        while not event.query():
            if time.monotonic() > deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        return True

    def record_stream(self, tensor: torch.Tensor, stream) -> None:
        tensor.record_stream(stream)

    def read_flag(self, flag: torch.Tensor, timeout_s: float) -> list[int]:
        """The host's one look at device-side flags (once per step at most): copied to pinned
        memory behind the stream's work, waited for at most timeout_s (the work before it may
        be stuck in a collective that no watchdog watches: captured in a CUDA graph)."""
        host = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        if not self.wait_event(copied, timeout_s):
            raise RuntimeError(f"the decode step did not finish within {timeout_s} s (a peer stalled in a collective)")
        return host.tolist()

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
    def __init__(self, layer: "DryRuntime"):
        self._layer = layer
        self.in_capture = False  # recorded on the capturing stream while a capture was under way

    def record(self, stream=None):
        self._layer.calls["event.record"] += 1
        self.in_capture = self._layer.capturing()

    def wait(self, stream=None):
        self._layer.calls["event.wait"] += 1

    def synchronize(self):
        self._layer.calls["event.synchronize"] += 1

    def query(self) -> bool:
        self._layer.calls["event.query"] += 1
        return True

    def elapsed_time(self, end) -> float:
        return 0.0


class _InertStream:
    """A stream of the dry run. During a capture it follows CUDA's rules for streams joining
    one: a side stream joins by waiting on an event recorded on the capturing stream, leaves by
    the capturing stream waiting on it, and must have left when the capture ends."""

    def __init__(self, layer: "DryRuntime"):
        self._layer = layer

    def wait_event(self, event):
        self._layer.calls["stream.wait_event"] += 1
        if self._layer.capturing() and getattr(event, "in_capture", False):
            self._layer.joined.add(id(self))

    def wait_stream(self, stream):
        self._layer.calls["stream.wait_stream"] += 1
        if self._layer.capturing():
            self._layer.joined.discard(id(stream))


class _DryGraph:
    """A captured step in the dry run: replay() runs the captured function again, traced, and
    its trace must be the captured one op for op (same ops, shapes, strides, dtypes, Python
    arguments, and the same tensors from outside the step): what a CUDA graph would replay is
    then exactly what the step at this point would have done."""

    def __init__(self, layer: "DryRuntime", fn, trace: list, outside: list):
        # The tensors from outside the step stay referenced: their storages' addresses (how
        # the trace names them) cannot come back as a fresh tensor's.
        self.layer, self.fn, self.trace, self.outside = layer, fn, trace, outside

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
    re-runs it and compares. During a capture, work on a side stream that has not joined it,
    or a side stream still joined when it ends, fails as it would on a GPU."""

    def __init__(self, tracer=None, violation=AssertionError):
        self.calls: Counter = Counter()
        self.tracer, self.violation = tracer, violation
        self._capturing = False
        self.joined: set[int] = set()  # side streams joined to the capture under way

    def traced_capture(self, fn):
        if self.tracer is None:
            raise RuntimeError("DryRuntime: graph capture needs a tracer (the dry run's StepChecker)")
        self._capturing, self.joined = True, set()
        try:
            result = self.tracer.trace(fn)
            if self.joined:
                raise self.violation(f"{len(self.joined)} side stream(s) still joined to the capture when it ended "
                                     "(the capturing stream never waited on them): the capture would fail")
            return result
        finally:
            self._capturing = False

    def capture(self, fn, stream):
        self.calls["capture"] += 1
        trace, outputs = self.traced_capture(fn)
        return _DryGraph(self, fn, trace, self.tracer.outside), outputs

    def new_stream(self, device: torch.device):
        self.calls["new_stream"] += 1
        return _InertStream(self)

    def new_event(self, timing: bool = False):
        self.calls["new_event"] += 1
        return _InertEvent(self)

    def current_stream(self, device: torch.device):
        return _InertStream(self)

    def use_stream(self, stream):
        self.calls["use_stream"] += 1
        if self._capturing and id(stream) not in self.joined:
            raise self.violation("work on a side stream that has not joined the capture (no wait on an event "
                                 "recorded on the capturing stream first): the capture would fail")
        return contextlib.nullcontext()

    def capturing(self) -> bool:
        return self._capturing

    def wait_event(self, event, timeout_s: float) -> bool:
        self.calls["wait_event"] += 1
        return True

    def record_stream(self, tensor: torch.Tensor, stream) -> None:
        self.calls["record_stream"] += 1

    def read_flag(self, flag: torch.Tensor, timeout_s: float) -> list[int]:
        self.calls["read_flag"] += 1  # a fake tensor has no value: count the look, report no error
        return [0] * flag.numel()

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
