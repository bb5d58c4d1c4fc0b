"""Starting ranks: spawned processes on one machine, or an existing torchrun launch (one or
several nodes). Each rank runs on the GPU of its local rank (NCCL) or on the CPU (gloo): GPUs
when the machine has them, the CPU when it has none or when asked (device "cpu", or
HELIX_RANK_DEVICE=cpu); fewer GPUs than local ranks is an error, not a silent fall back to the
CPU. The device is set before the process group starts, which is told about it (device_id).
Every collective has a bounded timeout, so a rank that dies makes the others fail with an
error instead of hanging."""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailure(RuntimeError):
    """One or more ranks failed; the message carries their errors."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


RANK_DEVICES = ("auto", "cuda", "cpu", "threads")
THREADED = "threaded"  # the backend of in-process ranks (torch's thread-based process group)


class RankSetupError(RuntimeError):
    """The machine cannot run the ranks as asked (e.g. fewer GPUs than ranks)."""


def choose_backend(local_ranks: int, device: str | None = None) -> str:
    """"nccl" (one GPU per rank on this machine) or "gloo" (the CPU) for `local_ranks` ranks.

    device: "auto" (GPUs when the machine has any, else the CPU), "cuda", "cpu", or "threads"
    (every rank a thread of this process, all on GPU 0 when there is one, else on the CPU:
    how one GPU runs the whole multi-rank GPU path); default HELIX_RANK_DEVICE, else "auto".
    Fewer GPUs than local ranks raises RankSetupError (unless the CPU or threads are asked
    for) instead of quietly running on the CPU."""
    device = device or os.environ.get("HELIX_RANK_DEVICE", "auto")
    if device not in RANK_DEVICES:
        raise RankSetupError(f"device must be one of {RANK_DEVICES}, got {device!r}")
    if device == "threads":
        return THREADED
    if device == "cpu":
        return "gloo"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0 and device == "auto":
        return "gloo"
    if gpus < local_ranks:
        raise RankSetupError(f"{local_ranks} ranks on this machine need one GPU each, but it has {gpus}; "
                             "run fewer ranks per node, or ask for the CPU (--device cpu, HELIX_RANK_DEVICE=cpu)")
    return "nccl"


def backend_uses_gpus(backend: str) -> bool:
    """Whether ranks on `backend` run on GPUs: NCCL, or threads on a machine with a GPU."""
    return backend == "nccl" or (backend == THREADED and torch.cuda.is_available())


def default_exchange(world_size: int, device: str | None = None) -> str:
    """The exchange backend a launch gets unless one is asked for: "fused" for CPU ranks that
    all run on this machine (processes or threads: the exchange and the TP all-reduces go
    through memory they share, where a gloo collective among ranks that outnumber the cores
    costs milliseconds), "nccl" otherwise (GPU ranks, or ranks on several nodes)."""
    if local_world_size(world_size) != world_size:
        return "nccl"
    try:
        backend = choose_backend(world_size, device)
    except RankSetupError:
        return "nccl"  # the launch itself reports the error
    return "nccl" if backend_uses_gpus(backend) else "fused"


def local_world_size(world_size: int) -> int:
    """Ranks on this machine: LOCAL_WORLD_SIZE under torchrun, else all of them."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def local_rank(rank: int) -> int:
    """This process's index on its machine: LOCAL_RANK under torchrun (multi-node launches
    included), else the rank (spawned ranks all run on one machine)."""
    return int(os.environ.get("LOCAL_RANK", rank))


def rank_device(backend: str, rank: int) -> torch.device:
    """The rank's device, made current: the GPU of its local rank for NCCL; GPU 0, shared, for
    in-process (threaded) ranks on a machine with a GPU; else the CPU."""
    if backend == THREADED:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        # A compute stream of the rank's own (current streams are per thread): on the shared
        # default stream one rank's wait for its combine would queue ahead of a peer's signal.
        torch.cuda.set_stream(torch.cuda.Stream(device))
        return device
    if backend == "nccl":
        index = local_rank(rank)
        if index >= torch.cuda.device_count():
            raise RankSetupError(f"local rank {index} has no GPU of its own ({torch.cuda.device_count()} visible)")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


_TIMEOUT: list = [None]  # the collective timeout the ranks of this process were started with


def collective_timeout() -> datetime.timedelta | None:
    """The timeout the ranks of this process were started with (None: not started here, torch's
    default), for the groups they make: dist.new_group does not inherit it, and a rank waiting
    in a group's store barrier for a peer that failed would otherwise wait 30 minutes."""
    return _TIMEOUT[0]


def start_process_group(backend: str, rank: int, world_size: int, timeout_s: float) -> None:
    """init_process_group with the collective timeout, after the rank's device is set (NCCL:
    device_id binds the communicator to it). The rendezvous comes from the environment."""
    _TIMEOUT[0] = datetime.timedelta(seconds=timeout_s)
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = rank_device(backend, rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def init_process_group(rank: int, world_size: int, port: int, backend: str, timeout_s: float) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    start_process_group(backend, rank, world_size, timeout_s)


def rank_threads(world_size: int) -> int:
    """Torch threads per rank when world_size ranks share this machine's cores."""
    return max(1, (os.cpu_count() or 1) // world_size)


def _worker(fn, rank, world_size, port, backend, timeout_s, args, results):
    torch.set_num_threads(rank_threads(world_size))
    try:
        init_process_group(rank, world_size, port, backend, timeout_s)
        # Pickled by value here: torch.multiprocessing's queue would pass tensors as shared-memory
        # handles served by this process, which may have exited by the time the parent reads them.
        results.put((rank, "ok", pickle.dumps(fn(rank, backend, *args))))
    except BaseException as error:  # noqa: BLE001  (reported to the parent, then re-raised there)
        results.put((rank, "error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_threads(fn: Callable[..., Any], world_size: int, args: tuple = (), timeout_s: float = 120.0,
                  return_errors: bool = False) -> list:
    """Run fn(rank, "threaded", *args) on world_size threads of this process over torch's
    thread-based process group (its collectives exchange the threads' tensors in memory, CPU or
    CUDA); the same contract as spawn(). One GPU thus runs every rank of a layout."""
    import threading

    from torch.testing._internal.distributed.multi_threaded_pg import (ProcessLocalGroup, _install_threaded_pg,
                                                                        _uninstall_threaded_pg)

    store = dist.HashStore()
    outcome: dict[int, tuple[str, Any]] = {}

    def worker(rank: int) -> None:
        try:
            dist.init_process_group(THREADED, rank=rank, world_size=world_size, store=store,
                                    timeout=datetime.timedelta(seconds=timeout_s))
            outcome[rank] = ("ok", fn(rank, THREADED, *args))
        except BaseException as error:  # noqa: BLE001  (reported like a process's error)
            outcome[rank] = ("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
            ProcessLocalGroup.exception_handle(error)  # wake the ranks waiting in a collective
        finally:
            # A thread stuck past the run (see below) must not touch whatever group the process
            # holds by the time it wakes: only its own threaded world.
            if dist.distributed_c10d._world is world and dist.is_initialized():
                dist.destroy_process_group()

    _TIMEOUT[0] = datetime.timedelta(seconds=timeout_s)
    # The ranks share the process's cores as process ranks do (_worker): each op a rank
    # runs gets cores / ranks threads, so their parallel regions do not oversubscribe the CPU.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(rank_threads(world_size))
    world = _install_threaded_pg()
    # Group names live in one process-wide C++ registry (for functional collectives, which the
    # runtime does not use): every thread's default group is "0", so registering would collide.
    c10d = dist.distributed_c10d
    register = c10d._register_process_group
    c10d._register_process_group = lambda name, group: None
    try:
        threads = [threading.Thread(target=worker, args=(rank,), daemon=True) for rank in range(world_size)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout_s + 60.0
        while any(thread.is_alive() for thread in threads) and time.monotonic() < deadline:
            for thread in threads:
                thread.join(timeout=0.1)
            if any(status == "error" for status, _ in list(outcome.values())):
                # A rank failed: its peers get a few seconds to fail too (a peer waiting in a
                # group's store barrier is not woken), then count as stuck.
                deadline = min(deadline, time.monotonic() + 5.0)
    finally:
        c10d._register_process_group = register
        _uninstall_threaded_pg()
        ProcessLocalGroup.reset()
        torch.set_num_threads(threads_before)
    for rank in range(world_size):
        outcome.setdefault(rank, ("error", f"rank {rank} gave no result (stuck after another rank failed, "
                                           f"or past {timeout_s + 60:.0f} s)"))
    return _collect(outcome, world_size, return_errors)


def _collect(outcome: dict, world_size: int, return_errors: bool) -> list:
    if return_errors:
        return [value if status == "ok" else ("error", value) for status, value in
                (outcome[rank] for rank in range(world_size))]
    failures = [f"rank {rank}: {value}" for rank, (status, value) in sorted(outcome.items()) if status != "ok"]
    if failures:
        raise RankFailure("\n".join(failures))
    return [outcome[rank][1] for rank in range(world_size)]


def spawn(fn: Callable[..., Any], world_size: int, args: tuple = (), backend: str | None = None,
          timeout_s: float = 120.0, return_errors: bool = False, device: str | None = None) -> list:
    """Run fn(rank, backend, *args) on world_size fresh processes; return the ranks' results.

    A rank that raises, or dies without a result, fails the whole run with RankFailure (or,
    with return_errors, comes back as an ("error", message) entry). Nothing waits longer than
    the collective timeout plus a margin. device: see choose_backend (ignored with a backend);
    the threaded backend runs the ranks as threads of this process (spawn_threads)."""
    backend = backend or choose_backend(world_size, device)
    if backend == THREADED:
        return spawn_threads(fn, world_size, args, timeout_s, return_errors)
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_worker, args=(fn, rank, world_size, port, backend, timeout_s, args, results),
                                 daemon=True) for rank in range(world_size)]
    for process in processes:
        process.start()
    outcome: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s + 60.0
    while len(outcome) < world_size and time.monotonic() < deadline:
        try:
            rank, status, value = results.get(timeout=0.5)
            outcome[rank] = (status, pickle.loads(value) if status == "ok" else value)
        except queue.Empty:
            for rank, process in enumerate(processes):
                if rank not in outcome and not process.is_alive() and process.exitcode not in (0, None):
                    outcome[rank] = ("error", f"rank {rank} died (exit code {process.exitcode}) without a result")
    for rank in range(world_size):
        outcome.setdefault(rank, ("error", f"rank {rank} gave no result within {timeout_s + 60:.0f} s"))
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
    return _collect(outcome, world_size, return_errors)


def torchrun_environment() -> tuple[int, int] | None:
    """(rank, world_size) when started by torchrun, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def run_under_torchrun(fn: Callable[..., Any], world_size: int, args: tuple = (),
                       backend: str | None = None, timeout_s: float = 600.0, device: str | None = None) -> list | None:
    """Under torchrun: run fn(rank, backend, *args) on this rank and gather every rank's result
    on rank 0 (returned there as a list; None on the other ranks). The launch must have
    started exactly world_size ranks (on any number of nodes: the GPU is LOCAL_RANK's, and
    there must be one per rank of the node, LOCAL_WORLD_SIZE); collectives time out after
    timeout_s."""
    rank, started = torchrun_environment()
    if started != world_size:
        raise ValueError(f"torchrun started {started} ranks but kvp x tpa = {world_size}")
    backend = backend or choose_backend(local_world_size(started), device)
    if backend == THREADED:
        raise RankSetupError("threads run every rank in one process: not under torchrun, which starts a process "
                             "per rank (use --device cuda or cpu there)")
    start_process_group(backend, rank, world_size, timeout_s)
    try:
        result = fn(rank, backend, *args)
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(result, gathered, dst=0)
    finally:
        dist.destroy_process_group()
    return gathered
