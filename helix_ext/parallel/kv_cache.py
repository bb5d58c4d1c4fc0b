"""HelixKVCache: one rank's KV-parallel shard of a paged KV cache, for every layer.

A sequence's tokens are grouped in blocks of `block_size` (= tokens_per_block) by absolute
position, and block b lives on KVP rank b % kvp: a prompt's KV is dealt out block by block,
and decode appends are staggered round-robin, a whole block on one rank before the next rank
takes over. Local blocks are full except a sequence's last one, so the shard is an ordinary
paged cache for flash_decode, and ranks never differ by more than one block per sequence. A
rank may hold no token of a sequence (a short sequence, or early decode): flash_decode then
returns lse = -inf for it, which merge_states treats as absent.
"""

from __future__ import annotations

import math

import torch


class HelixKVCache:
    def __init__(self, *, num_layers: int, batch: int, num_kv_heads: int, head_dim_k: int, head_dim_v: int | None,
                 block_size: int, kvp: int, kvp_index: int, capacity_tokens: list[int], dtype: torch.dtype,
                 device: torch.device):
        """capacity_tokens[b]: the most tokens sequence b will ever hold (context + new tokens)."""
        self.block_size, self.kvp, self.kvp_index = block_size, kvp, kvp_index
        self.batch = batch
        local_blocks = [self._local_blocks_needed(tokens) for tokens in capacity_tokens]
        self.max_blocks = max(local_blocks + [1])
        num_blocks = max(sum(local_blocks), 1)
        self.keys = [torch.zeros(num_blocks, block_size, num_kv_heads, head_dim_k, dtype=dtype, device=device)
                     for _ in range(num_layers)]
        self.values = None if head_dim_v is None else [
            torch.zeros(num_blocks, block_size, num_kv_heads, head_dim_v, dtype=dtype, device=device)
            for _ in range(num_layers)]
        # Unused table entries point at block 0; flash_decode never reads past seq_lens.
        self._table = [[] for _ in range(batch)]  # host copy: physical block of each local block
        self._lengths = [0] * batch               # host copy: tokens held per sequence
        self._next_free = 0
        self.block_table = torch.zeros(batch, self.max_blocks, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(batch, dtype=torch.int32, device=device)

    def _local_blocks_needed(self, tokens: int) -> int:
        global_blocks = math.ceil(tokens / self.block_size)
        return len(range(self.kvp_index, global_blocks, self.kvp))

    def owner(self, position: int) -> int:
        """The KVP rank that holds the token at `position`."""
        return (position // self.block_size) % self.kvp

    def owns(self, position: int) -> bool:
        return self.owner(position) == self.kvp_index

    def _slot(self, sequence: int, position: int) -> tuple[int, int]:
        """(physical block, offset) of an owned position, allocating its block when it starts."""
        local_block = (position // self.block_size) // self.kvp
        table = self._table[sequence]
        allocating = local_block == len(table)
        if local_block > len(table) or local_block >= self.max_blocks or (
                allocating and self._next_free >= self.keys[0].shape[0]):
            raise RuntimeError(f"HelixKVCache: sequence {sequence} outgrew its capacity at position {position}")
        if allocating:
            table.append(self._next_free)
            self.block_table[sequence, local_block] = self._next_free
            self._next_free += 1
        return table[local_block], position % self.block_size

    def tokens_held(self) -> list[int]:
        return list(self._lengths)

    def load_context(self, lengths: list[int], make_block) -> None:
        """Deal out each sequence's first lengths[b] tokens: make_block(layer, b, block) returns
        that block's (keys [n, H, Dk], values [n, H, Dv] or None); only owned blocks are asked for."""
        for b, tokens in enumerate(lengths):
            for block in range(self.kvp_index, math.ceil(tokens / self.block_size), self.kvp):
                physical, _ = self._slot(b, block * self.block_size)
                count = min(self.block_size, tokens - block * self.block_size)
                for layer in range(len(self.keys)):
                    keys, values = make_block(layer, b, block)
                    self.keys[layer][physical, :count] = keys.to(self.keys[layer].dtype)
                    if self.values is not None:
                        self.values[layer][physical, :count] = values.to(self.values[layer].dtype)
                self._lengths[b] += count
        self.seq_lens.copy_(torch.tensor(self._lengths, dtype=torch.int32))

    def begin_step(self, positions: list[int]) -> list[tuple[int, int, int]]:
        """Reserve the slots of this step's tokens that this rank owns: [(sequence, block, offset)].
        The new tokens count as held from here on (each attends to itself)."""
        slots = []
        for b, position in enumerate(positions):
            if self.owns(position):
                physical, offset = self._slot(b, position)
                slots.append((b, physical, offset))
                self._lengths[b] += 1
        if slots:
            self.seq_lens.copy_(torch.tensor(self._lengths, dtype=torch.int32))
        return slots

    def write(self, layer: int, slots: list[tuple[int, int, int]], keys: torch.Tensor,
              values: torch.Tensor | None) -> None:
        """Store this step's entries (keys [B, H, Dk], values [B, H, Dv]) of the owned slots."""
        for b, physical, offset in slots:
            self.keys[layer][physical, offset] = keys[b]
            if self.values is not None:
                self.values[layer][physical, offset] = values[b]
