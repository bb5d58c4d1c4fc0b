"""The GPU dry run: the runtime's GPU path, checked on a machine without a GPU.

Every rank's view in turn, in this process: a fake process group (torch's, for tests: its
collectives do nothing), fake CUDA tensors (FakeTensorMode: shapes, dtypes and devices, no
data), the device layer's inert stand-in for streams and events, and HelixDecoder decoding a
few steps. It proves what can be proven without data:
- no host sync inside a step: reading a fake tensor's value (`.item()`, `.tolist()`, `int(t)`,
  a data-dependent shape) raises, and so does a copy between the host and the device;
- every tensor a step makes lives on the rank's GPU (none on the CPU, none on another GPU);
- every op's CUDA constraints hold: on CUDA tensors the fake kernels check what the CUDA
  kernels check (helix_ext.ops), so a head dim or dtype the CUDA kernel lacks fails here;
- with cuda_graphs, the step can be captured once and replayed: the capture records the
  step's op trace (ops, shapes, strides, dtypes, Python arguments, which tensors come from
  outside the step), and every later step, run again in place of the replay, must give the
  same trace: no allocation whose size, and no kernel argument whose value, depends on a host
  value that changes from step to step, and no input tensor made afresh per step.
Building the decoder (weights, the context's KV) may copy from the host: that is set-up, not a
step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from helix_ext.parallel.config import HelixConfig
from helix_ext.parallel.device import DryRuntime, use_runtime


def _tensors(value):
    """The tensors in an op's arguments or result (nested lists, tuples, dicts)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class DryRunViolation(AssertionError):
    """The step did something the GPU path must not (a host sync, a tensor off the rank's GPU)."""


class StepChecker(TorchDispatchMode):
    """While armed, every op's tensors must be on `device`; host <-> device copies are refused."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.armed = False
        self.ops = 0
        self._trace: list | None = None   # while tracing: one signature per op
        self._made: dict[int, int] = {}  # while tracing: storages the traced ops made -> their number
        self._count = 0
        self.outside: list[torch.Tensor] = []  # the last trace's tensors from outside the step

    def trace(self, fn):
        """(the op trace of fn(), fn's result): see _signature."""
        self._trace, self._made, self._count, self.outside = [], {}, 0, []
        try:
            result = fn()
            return self._trace, result
        finally:
            self._trace, self._made = None, {}

    def _describe(self, value):
        """An op argument as the trace records it: a tensor by its storage (numbered in the
        order the traced ops made them, or by identity when it came from outside), view
        geometry, dtype and device; Python values as they are."""
        if isinstance(value, torch.Tensor):
            key = value.untyped_storage()._cdata
            if key not in self._made:
                self.outside.append(value)  # kept alive by the caller (a capture): the address stays its
            origin = ("made", self._made[key]) if key in self._made else ("outside", key)
            return ("tensor", origin, tuple(value.shape), value.stride(), value.storage_offset(), value.dtype,
                    value.device)
        if isinstance(value, (list, tuple)):
            return tuple(self._describe(item) for item in value)
        if isinstance(value, dict):
            return tuple((k, self._describe(v)) for k, v in sorted(value.items()))
        if value is None or isinstance(value, (bool, int, float, complex, str, torch.dtype, torch.device,
                                               torch.layout, torch.memory_format)):
            return value
        return ("object", type(value).__name__)  # e.g. a process group or a Work (wrappers made per call)

    def _record(self, func, args, kwargs, result) -> None:
        entry = (str(func), self._describe(args), self._describe(kwargs))
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
        for output in _tensors(result):  # new storages (not an in-place op's or a view's input)
            key = output.untyped_storage()._cdata
            if key not in inputs:  # numbered afresh: a freed storage's address may come back
                self._made[key] = self._count
                self._count += 1
        self._trace.append((entry, self._describe(result)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.armed and func is torch.ops.aten._local_scalar_dense.default:
            raise DryRunViolation("a host read of a device value (.item(), float(), int(), .tolist(), a Python "
                                  "branch on a tensor) inside a decode step: a host sync on a GPU")
        result = func(*args, **kwargs)
        if self.armed:
            self.ops += 1
            self._check(func, args, kwargs, result)
        if self._trace is not None:
            self._record(func, args, kwargs, result)
        return result

    def _check(self, func, args, kwargs, result) -> None:
        # Every output on the rank's device; inputs too, but for 0-dim CPU tensors (Python scalars
        # that torch wraps, which cost no copy).
        checked = [("an output", t) for t in _tensors(result)]
        checked += [("an input", t) for t in _tensors((args, kwargs)) if t.dim() > 0]
        for role, tensor in checked:
            if tensor.device != self.device:
                raise DryRunViolation(f"{func} has {role} on {tensor.device} inside a decode step (rank device "
                                      f"{self.device}): a host <-> device copy or a tensor off the GPU")


@dataclass
class DryRunReport:
    rank: int
    steps: int
    ops_per_step: float
    device_calls: dict = field(default_factory=dict)


def dry_run_rank(model, helix: HelixConfig, rank: int, context_lengths: list[int], steps: int = 2,
                 device: torch.device | None = None, step_tokens: int = 1) -> DryRunReport:
    """Rank `rank`'s decoder on fake CUDA tensors over a fake process group: build it, then run
    `steps` decode steps under StepChecker (with helix.cuda_graphs: an eager step, the capture
    and replays, each replay checked against the capture). Raises DryRunViolation (or the op's
    own error) on the first thing the GPU path must not do. step_tokens > 1: speculative
    decoding's steps of that many tokens per sequence, each followed by a rollback that keeps
    1 to step_tokens of them (a fixed pattern: fake logits have no values to verify drafts
    with); the rollback and the next step's drafts are host work between steps, outside the
    checker, like the drafting and verification they stand for."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from helix_ext.parallel.decoder import HelixDecoder, HelixGroups

    if helix.cuda_graphs and steps < 3:
        raise ValueError(f"a dry run with cuda_graphs needs steps >= 3 (an eager step, the capture, and a replay "
                         f"at a later step to compare with it), got {steps}")
    device = device or torch.device("cuda", 0)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=helix.world_size)
    try:
        checker = StepChecker(device)
        layer = DryRuntime(tracer=checker, violation=DryRunViolation)
        with FakeTensorMode(allow_non_fake_inputs=True), use_runtime(layer), checker:
            groups = HelixGroups(helix, rank)
            decoder = HelixDecoder(model, helix, rank, groups, context_lengths, steps * step_tokens, device,
                                   max_step_tokens=step_tokens)
            shape = (len(context_lengths),) if step_tokens == 1 else (len(context_lengths), step_tokens)
            tokens = torch.zeros(shape, dtype=torch.int64, device=device)
            positions = list(context_lengths)
            checker.armed = True
            for step in range(steps):
                logits = decoder.step(tokens, positions)
                tokens = logits.argmax(dim=-1)  # stays on the device: the next step's input
                if step_tokens == 1:
                    positions = [p + 1 for p in positions]
                    continue
                checker.armed = False
                kept = [1 + (step + b) % step_tokens for b in range(len(positions))]
                decoder.rollback(kept)
                positions = [p + k for p, k in zip(positions, kept)]
                checker.armed = True
            checker.armed = False
        return DryRunReport(rank=rank, steps=steps, ops_per_step=checker.ops / max(1, steps),
                            device_calls=dict(layer.calls))
    finally:
        dist.destroy_process_group()


def dry_run(model, helix: HelixConfig, context_lengths: list[int], steps: int = 2,
            step_tokens: int = 1) -> list[DryRunReport]:
    """Every rank's view of the GPU path, one after another (see dry_run_rank)."""
    return [dry_run_rank(model, helix, rank, context_lengths, steps, step_tokens=step_tokens)
            for rank in range(helix.world_size)]
