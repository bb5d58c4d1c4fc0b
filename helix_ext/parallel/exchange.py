"""The exchange of Helix's attention: partial outputs and LSEs of every KVP rank, regrouped by
query head, one all-to-all inside the KVP group, then merged with merge_states.

Backends share one interface, begin_layer(), start(out, lse) -> handle, finish(handle) ->
(merged out [B, h, Dv], merged lse [B, h]) for the h query heads this rank owns after the
exchange, and end_step() once per decode step (where errors found on the device surface), so
HOP-B can start chunk c's exchange and finish it while chunk c+1's attention computes, and the
backends are interchangeable without touching the layers:
  "nccl":  torch.distributed all-to-all of the partials, then merge_states;
  "fused": each rank writes its partials into its own symmetric (GPU) or shared (CPU) buffer
           and raises a flag; every rank then reads its heads' partials from its peers'
           buffers in place and merges them in one kernel (fused_exchange.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from helix_ext.ops import merge_states
from helix_ext.parallel.config import split_offsets


class CollectiveExchange:
    """Backend "nccl": torch.distributed.all_to_all_single over the KVP group (NCCL on GPUs,
    gloo on CPU). Output and LSE travel together: per destination one byte buffer holding
    that destination's head slice of the partial output, then of the LSE."""

    name = "nccl"

    def __init__(self, head_counts: list[int], kvp_index: int, group, async_ops: bool = True):
        self.head_counts = head_counts      # heads each KVP rank merges (as even as possible)
        self.offsets = split_offsets(head_counts)
        self.kvp_index = kvp_index
        self.group = group
        self.async_ops = async_ops
        self.bytes_sent = 0

    @property
    def kvp(self) -> int:
        return len(self.head_counts)

    def begin_layer(self) -> None:
        pass

    def end_step(self) -> None:
        pass  # collectives report their own errors

    def start(self, out: torch.Tensor, lse: torch.Tensor):
        """out [B, H, Dv], lse [B, H] over this TPA group's H query heads."""
        batch, _, head_dim = out.shape
        if self.kvp == 1:  # nothing to exchange: the rank merges its own (single) part
            return None, out.unsqueeze(0), lse.unsqueeze(0)
        # Byte views (out's rows are whole heads of Dv elements, lse's of 4 bytes): per
        # destination its heads' out, then their lse, flattened into one send buffer by cat.
        out_bytes, lse_bytes = out.view(torch.uint8), lse.view(torch.uint8)
        pieces, sizes = [], []
        for offset, count in zip(self.offsets, self.head_counts):
            pieces += [out_bytes[:, offset:offset + count].reshape(-1),
                       lse_bytes[:, 4 * offset:4 * (offset + count)].reshape(-1)]
            sizes.append(batch * count * (head_dim * out.element_size() + 4))
        send = torch.cat(pieces)
        mine = self.head_counts[self.kvp_index]
        receive_bytes = batch * mine * (head_dim * out.element_size() + 4)
        receive = torch.empty(receive_bytes * self.kvp, dtype=torch.uint8, device=out.device)
        self.bytes_sent += send.numel() - sizes[self.kvp_index]  # the own slice does not leave the rank
        work = dist.all_to_all_single(receive, send, output_split_sizes=[receive_bytes] * self.kvp,
                                      input_split_sizes=sizes, group=self.group, async_op=self.async_ops)
        return work, receive, (batch, mine, head_dim, out.dtype)

    def finish(self, handle) -> tuple[torch.Tensor, torch.Tensor]:
        return merge_states(*self.receive(handle))

    def receive(self, handle) -> tuple[torch.Tensor, torch.Tensor]:
        """The gathered partials of this rank's heads: [kvp, B, h, Dv] and [kvp, B, h]."""
        work, payload, meta = handle
        if self.kvp == 1:
            return payload, meta  # (out[None], lse[None])
        if work is not None:
            work.wait()
        batch, heads, head_dim, dtype = meta
        if heads == 0:  # more KVP ranks than heads: this one merges none (it only sent)
            return (torch.empty(self.kvp, batch, 0, head_dim, dtype=dtype, device=payload.device),
                    torch.empty(self.kvp, batch, 0, dtype=torch.float32, device=payload.device))
        element = dtype.itemsize
        out_bytes, lse_bytes = batch * heads * head_dim * element, batch * heads * 4
        chunks = payload.view(self.kvp, out_bytes + lse_bytes)
        parts_out = chunks[:, :out_bytes].contiguous().view(dtype).view(self.kvp, batch, heads, head_dim)
        parts_lse = chunks[:, out_bytes:].contiguous().view(torch.float32).view(self.kvp, batch, heads)
        return parts_out, parts_lse


def make_exchange(name: str, head_counts: list[int], kvp_index: int, group, *, max_batch: int, head_dim: int,
                  dtype: torch.dtype, device: torch.device, max_chunks: int, timeout_s: float):
    if name == "nccl":
        return CollectiveExchange(head_counts, kvp_index, group)
    if name == "fused":
        from helix_ext.parallel.fused_exchange import FusedExchange

        return FusedExchange(group, kvp_index, head_counts, max_batch, head_dim, dtype, device,
                             max_chunks=max_chunks, timeout_s=timeout_s)
    raise ValueError(f"unknown exchange backend {name!r} (available: 'nccl', 'fused')")
