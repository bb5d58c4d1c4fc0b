"""The "fused" exchange backend: HOP-B's combine reading the peers' partial states in place.

Every rank of a KVP group owns one buffer that all of them can address: on GPUs a tensor of
torch's symmetric memory (`torch.distributed._symmetric_memory`: peer mapping over NVLink,
multi-node NVLink domains included, is torch's), on the CPU a shared-memory file per rank
mapped by every rank of the machine. Layout (bytes):

    [flags: one int32 per chunk slot, padded to 256 B]
    [slot 0: for each destination j: out [max_rows, heads_j, D] then lse [max_rows, heads_j]]
    [slot 1: ...] ...

start(out, lse) writes this rank's partials into its own buffer, destination by destination,
then `hopb_signal` bumps the slot's epoch (kept in device memory, so graph replays never see
last step's flag) and publishes it as the slot's flag with release semantics. finish(handle)
runs `hopb_combine`: wait (acquire, bounded) until every peer's flag for the slot reaches
this rank's epoch, read each peer's region for this rank, merge with the merge_states math.
A combine that times out on a GPU records the missing peer in a device-side error flag; the
host reads it once per decode step, in end_step() (reading it after every chunk would make
the host wait for combine(c) before it enqueues combine(c+1), and HOP-B would not overlap).
A buffer is rewritten only in the next layer, after the output projection's all-reduce,
which no rank passes before every rank has finished its combines: no further handshake.
On GPUs the combine runs on a side stream, after an event of the compute stream, so chunk
c's combine overlaps chunk c+1's attention (HOP-B).
"""

from __future__ import annotations

import os
import secrets

import torch
import torch.distributed as dist

from helix_ext.parallel.config import split_offsets
from helix_ext.parallel.device import runtime

_FLAG_BYTES = 256
_IN_PROCESS_BUFFERS: dict[tuple[str, int], torch.Tensor] = {}  # (token, kvp index) -> buffer, while ranks meet


class FusedExchange:
    name = "fused"

    def __init__(self, group, kvp_index: int, head_counts: list[int], max_batch: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, *, max_chunks: int = 1, timeout_s: float = 60.0):
        self.group, self.kvp_index, self.head_counts = group, kvp_index, head_counts
        self.max_rows, self.head_dim, self.dtype, self.device = max_batch, head_dim, dtype, device
        self.max_chunks, self.timeout_s = max_chunks, timeout_s
        self.element = dtype.itemsize
        # Byte offsets of (slot, destination) regions; out then lse, each 16-byte aligned.
        self.region_bytes = [self._aligned(max_batch * h * head_dim * self.element) + self._aligned(max_batch * h * 4)
                             for h in head_counts]
        self.slot_bytes = sum(self.region_bytes)
        self.total_bytes = _FLAG_BYTES + max_chunks * self.slot_bytes
        if max_chunks * 4 > _FLAG_BYTES:
            raise ValueError(f"FusedExchange: at most {_FLAG_BYTES // 4} chunks in flight, got {max_chunks}")
        self._handle = None  # GPUs: the symmetric-memory handle that keeps the peer mapping alive
        self.buffers = self._allocate()  # [peer] uint8 views, in KVP-group order; mine at kvp_index
        self._views: dict = {("flags", peer): self.buffers[peer][:max_chunks * 4].view(torch.int32)
                             for peer in range(self.kvp)}
        self.epoch = torch.zeros(max_chunks, dtype=torch.int32, device=device)
        # Device-side error flags: [0] this exchange's combines, [1] the step's PeerAllReduce
        # (given the view error[1:]), so one host read per step checks both.
        self.error = torch.zeros(2, dtype=torch.int32, device=device)
        self.bytes_sent = 0  # bytes peers read from this rank's buffer
        self.error_checks = 0  # host reads of the error flag: one per decode step
        self._slot = 0
        self._stream = runtime().new_stream(device) if device.type == "cuda" else None

    @staticmethod
    def _aligned(nbytes: int) -> int:
        return (nbytes + 15) // 16 * 16

    @property
    def kvp(self) -> int:
        return len(self.head_counts)

    # ---------------------------------------------------------------- buffers
    def _allocate(self) -> list[torch.Tensor]:
        buffers, self._handle = allocate_peer_buffers(self.group, self.kvp_index, self.kvp, self.total_bytes,
                                                      self.device)
        return buffers

    def _flags(self, peer: int) -> torch.Tensor:
        return self._views[("flags", peer)]

    def _region(self, peer: int, slot: int, destination: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of peer's region for `destination` in `slot`: out [rows, h, D], lse [rows, h]
        (made once per shape: a decode step asks for the same ones every layer)."""
        key = (peer, slot, destination, rows)
        if key not in self._views:
            self._views[key] = self._make_region(peer, slot, destination, rows)
        return self._views[key]

    def _make_region(self, peer: int, slot: int, destination: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        heads = self.head_counts[destination]
        start = _FLAG_BYTES + slot * self.slot_bytes + sum(self.region_bytes[:destination])
        out_bytes = rows * heads * self.head_dim * self.element
        out = self.buffers[peer][start:start + out_bytes].view(self.dtype).view(rows, heads, self.head_dim)
        lse_start = start + self._aligned(self.max_rows * heads * self.head_dim * self.element)
        lse = self.buffers[peer][lse_start:lse_start + rows * heads * 4].view(torch.float32).view(rows, heads)
        return out, lse

    # ---------------------------------------------------------------- exchange
    def begin_layer(self) -> None:
        self._slot = 0

    def start(self, out: torch.Tensor, lse: torch.Tensor):
        """Publish this rank's partials (out [rows, H, Dv], lse [rows, H]) for every destination."""
        rows = out.shape[0]
        if rows > self.max_rows or self._slot >= self.max_chunks:
            raise ValueError(f"FusedExchange: {rows} rows in slot {self._slot} exceed the buffer "
                             f"({self.max_rows} rows, {self.max_chunks} slots)")
        slot = self._slot
        self._slot += 1
        for destination, (offset, count) in enumerate(zip(split_offsets(self.head_counts), self.head_counts)):
            region_out, region_lse = self._region(self.kvp_index, slot, destination, rows)
            region_out.copy_(out[:, offset:offset + count])
            region_lse.copy_(lse[:, offset:offset + count])
            if destination != self.kvp_index:
                self.bytes_sent += region_out.numel() * self.element + region_lse.numel() * 4
        torch.ops.helix.hopb_signal(self._flags(self.kvp_index), self.epoch, slot)
        event = None
        if self._stream is not None:
            event = runtime().new_event()
            event.record()
        return slot, rows, event

    def finish(self, handle) -> tuple[torch.Tensor, torch.Tensor]:
        """Wait for every peer's partials of this slot and merge them: (out [rows, h, Dv], lse [rows, h])."""
        slot, rows, event = handle
        views = [self._region(peer, slot, self.kvp_index, rows) for peer in range(self.kvp)]
        flags = [self._flags(peer) for peer in range(self.kvp)]
        arguments = ([v[0] for v in views], [v[1] for v in views], flags, self.epoch, slot, self.timeout_s,
                     self.error[:1])
        if self._stream is None:
            return torch.ops.helix.hopb_combine(*arguments)
        compute = runtime().current_stream(self.device)
        self._stream.wait_event(event)
        with runtime().use_stream(self._stream):
            out, lse = torch.ops.helix.hopb_combine(*arguments)
        compute.wait_stream(self._stream)
        runtime().record_stream(out, compute)
        runtime().record_stream(lse, compute)
        return out, lse

    def end_step(self) -> None:
        """After a decode step: raise if any of its combines timed out (one device sync on GPUs,
        where the step's results are read anyway; none while a CUDA graph is captured)."""
        if self.device.type == "cuda" and runtime().capturing():
            return
        self.check()

    def check(self) -> None:
        """Raise if a combine (or the step's PeerAllReduce) timed out waiting for a peer (a
        device sync on GPUs)."""
        self.error_checks += 1
        # A combine gives up after timeout_s; twice that and the step is stuck elsewhere.
        exchange, all_reduce = (runtime().read_flag(self.error, 2 * self.timeout_s) if self.device.type == "cuda"
                                else self.error.tolist())
        if exchange:
            raise RuntimeError(f"FusedExchange: KVP peer {exchange - 1} did not signal within {self.timeout_s} s")
        if all_reduce:
            raise RuntimeError(f"PeerAllReduce: rank {all_reduce - 1} did not signal within {self.timeout_s} s")


def allocate_peer_buffers(group, index: int, peers: int, nbytes: int, device: torch.device):
    """(a zeroed uint8 buffer of nbytes per rank of `group`, every one addressable by this rank,
    in group order with this rank's at `index`; the handle that keeps a GPU peer mapping alive).
    GPUs: torch symmetric memory. Ranks that are threads of one process (launch.spawn_threads):
    each allocates its own and takes its peers' from an in-process registry. CPU processes: one
    shared-memory file per rank, mapped by every rank, unlinked once all have mapped it."""
    threaded = dist.get_backend(group) == "threaded"
    if device.type == "cuda" and not threaded:
        return runtime().symmetric_buffers(nbytes, group, index, peers, device)
    # Named from a token rank 0 of the group draws.
    token = [secrets.token_hex(8) if index == 0 else None]
    dist.broadcast_object_list(token, src=dist.get_global_rank(group, 0), group=group)
    if threaded:
        local = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        _IN_PROCESS_BUFFERS[(token[0], index)] = local
        dist.barrier(group=group)  # every buffer registered
        buffers = [_IN_PROCESS_BUFFERS[(token[0], peer)] for peer in range(peers)]
        dist.barrier(group=group)  # everyone holds every buffer: the registry entries can go
        del _IN_PROCESS_BUFFERS[(token[0], index)]
        return buffers, None
    paths = [f"/dev/shm/helix-peer-{token[0]}-{peer}" for peer in range(peers)]
    try:
        local = torch.from_file(paths[index], shared=True, size=nbytes, dtype=torch.uint8)
        local.zero_()
        dist.barrier(group=group)  # every file exists (zeroed) before anyone maps it
        buffers = [local if peer == index else torch.from_file(paths[peer], shared=True, size=nbytes, dtype=torch.uint8)
                   for peer in range(peers)]
        dist.barrier(group=group)  # everyone mapped every file: the names can go
    finally:
        if os.path.exists(paths[index]):
            os.unlink(paths[index])
    return buffers, None


class PeerAllReduce:
    """The decode step's TP all-reduces (output projection, FFN) over peer memory, with exchange
    "fused": each rank copies its partial sum into its own buffer (shared memory between CPU
    ranks, symmetric memory between GPUs), raises the slot's flag (hopb_signal), and
    hopb_all_reduce waits for every peer's flag and sums the peers' parts in place, in rank
    order (the same bits on every rank). One copy and two ops per all-reduce: no transport
    round trips, which cost milliseconds each between CPU processes that share cores.

    Buffer reuse: calls alternate between two slots, so a rank overwrites a slot only after its
    previous all-reduce, which saw every peer's flag of that call, raised after the peer had
    finished reading the slot the call before (on GPUs, in stream order). A decode step makes
    an even number of calls (two per layer), so a captured CUDA graph's slot sequence chains
    across replays too (end_step checks it)."""

    SLOTS = 2

    def __init__(self, group, rank: int, world_size: int, max_numel: int, dtype: torch.dtype, device: torch.device,
                 timeout_s: float, error: torch.Tensor):
        """error: the device-side int32 flag a timed-out wait sets (1 + the missing rank): the
        fused exchange's error[1:], which its once-per-step check reads."""
        self.rank, self.world_size, self.max_numel = rank, world_size, max_numel
        self.dtype, self.device, self.timeout_s = dtype, device, timeout_s
        self.slot_bytes = (max_numel * dtype.itemsize + 15) // 16 * 16
        buffers, self._handle = allocate_peer_buffers(group, rank, world_size,
                                                      _FLAG_BYTES + self.SLOTS * self.slot_bytes, device)
        self.buffers = buffers
        self.flags = [b[:self.SLOTS * 4].view(torch.int32) for b in buffers]
        self.epoch = torch.zeros(self.SLOTS, dtype=torch.int32, device=device)
        self.error = error
        self.calls = 0
        self._views: dict = {}

    def _parts(self, slot: int, shape: torch.Size) -> list[torch.Tensor]:
        key = (slot, tuple(shape))
        if key not in self._views:
            numel = shape.numel()
            start = _FLAG_BYTES + slot * self.slot_bytes
            self._views[key] = [b[start:start + numel * self.dtype.itemsize].view(self.dtype).view(shape)
                                for b in self.buffers]
        return self._views[key]

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        """The sum over every rank of y (the same shape and dtype on each): a new tensor."""
        if y.numel() > self.max_numel or y.dtype != self.dtype:
            raise ValueError(f"PeerAllReduce: {tuple(y.shape)} {y.dtype} exceeds the buffer ({self.max_numel} "
                             f"elements of {self.dtype})")
        slot = self.calls % self.SLOTS
        self.calls += 1
        parts = self._parts(slot, y.shape)
        parts[self.rank].copy_(y)
        torch.ops.helix.hopb_signal(self.flags[self.rank], self.epoch, slot)
        return torch.ops.helix.hopb_all_reduce(parts, self.flags, self.epoch, slot, self.timeout_s, self.error)

    def end_step(self) -> None:
        """After a decode step: raise if it made an odd number of calls (timeouts are reported
        by the fused exchange's check, which reads the shared error flag)."""
        if self.calls % self.SLOTS:
            raise RuntimeError(f"PeerAllReduce: a decode step must make an even number of all-reduces "
                               f"(the slots alternate across steps), got {self.calls} so far")
