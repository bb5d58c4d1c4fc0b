"""HelixKVCache: one rank's KV-parallel shard of a paged KV cache, for every layer.

A sequence's tokens are grouped in blocks of `block_size` (= tokens_per_block) by absolute
position, and block b lives on KVP rank b % kvp: a prompt's KV is dealt out block by block,
and decode appends are staggered round-robin, a whole block on one rank before the next rank
takes over. Local blocks are full except a sequence's last one, so the shard is an ordinary
paged cache for flash_decode, and ranks never differ by more than one block per sequence. A
rank may hold no token of a sequence (a short sequence, or early decode): flash_decode then
returns lse = -inf for it, which merge_states treats as absent.

A decode step touches the host only for bookkeeping in Python ints (ownership, capacity
checks, tokens held): every block a sequence will ever need is assigned at construction, so
the block table is static on the device, and a step's slots, lengths and positions are
computed there (a token this rank does not own is written to a spare "trash" block that no
table row points at). No host <-> device copy, no host sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class StepSlots:
    """Where this step's new tokens go, on the device, per sequence: the physical block (the
    trash block when not owned) and the offset in it; and, from begin_step, the host list of
    the sequences this rank owns a token of."""

    physical: torch.Tensor   # [B * T] int64 (T: the step's tokens per sequence)
    offset: torch.Tensor     # [B * T] int64
    positions: torch.Tensor  # [B * T] int64: this step's positions (RoPE)
    sequences: list[int] | None = None
    # T > 1 (speculative decoding): [B, T] int32, the keys of this rank's shard that each of the
    # step's tokens sees (its own and the earlier ones, wherever they are owned); None for T = 1.
    query_key_lens: torch.Tensor | None = None


class HelixKVCache:
    def __init__(self, *, num_layers: int, batch: int, num_kv_heads: int, head_dim_k: int, head_dim_v: int | None,
                 block_size: int, kvp: int, kvp_index: int, capacity_tokens: list[int], dtype: torch.dtype,
                 device: torch.device):
        """capacity_tokens[b]: the most tokens sequence b will ever hold (context + new tokens)."""
        self.block_size, self.kvp, self.kvp_index = block_size, kvp, kvp_index
        self.batch = batch
        local_blocks = [self._local_blocks_needed(tokens) for tokens in capacity_tokens]
        self.max_blocks = max(local_blocks + [1])
        # Every local block of every sequence, assigned once; the last physical block is the trash.
        self._table = []  # host copy: physical block of each local block
        self.trash_block = 0
        for count in local_blocks:
            self._table.append(list(range(self.trash_block, self.trash_block + count)))
            self.trash_block += count
        num_blocks = self.trash_block + 1
        self.keys = [torch.zeros(num_blocks, block_size, num_kv_heads, head_dim_k, dtype=dtype, device=device)
                     for _ in range(num_layers)]
        self.values = None if head_dim_v is None else [
            torch.zeros(num_blocks, block_size, num_kv_heads, head_dim_v, dtype=dtype, device=device)
            for _ in range(num_layers)]
        # Unused table entries point at block 0; flash_decode never reads past seq_lens.
        table = torch.zeros(batch, self.max_blocks, dtype=torch.int32)
        for b, blocks in enumerate(self._table):
            table[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        self.block_table = table.to(device)
        self._lengths = [0] * batch               # host copy: tokens held per sequence
        self._next_positions: list[int] | None = None  # host copy: the next step's positions
        self._step: tuple[list[int], int] | None = None  # host copy: the last step's positions and T
        self.seq_lens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.positions = torch.zeros(batch, dtype=torch.int64, device=device)  # the next step's positions

    def _local_blocks_needed(self, tokens: int) -> int:
        global_blocks = math.ceil(tokens / self.block_size)
        return len(range(self.kvp_index, global_blocks, self.kvp))

    def owner(self, position: int) -> int:
        """The KVP rank that holds the token at `position`."""
        return (position // self.block_size) % self.kvp

    def owns(self, position: int) -> bool:
        return self.owner(position) == self.kvp_index

    def _slot(self, sequence: int, position: int) -> tuple[int, int]:
        """(physical block, offset) of an owned position (host bookkeeping)."""
        local_block = (position // self.block_size) // self.kvp
        table = self._table[sequence]
        if local_block >= len(table):
            raise RuntimeError(f"HelixKVCache: sequence {sequence} outgrew its capacity at position {position}")
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
        # Decoding starts at the first position after each context (set-up: copied once).
        self._next_positions = list(lengths)
        self.positions.copy_(torch.tensor(lengths, dtype=torch.int64))

    def begin_step(self, positions: list[int]) -> StepSlots:
        """The slots of this step's tokens (one per sequence, at `positions`, which must follow
        the previous step's); the tokens this rank owns count as held from here on (each attends
        to itself). advance() (host) then step_slots() (device)."""
        sequences = self.advance(positions)
        slots = self.step_slots()
        slots.sequences = sequences
        return slots

    def advance(self, positions: list[int], count: int = 1) -> list[int]:
        """The step's host bookkeeping, in ints: checks `positions` follow the previous step's
        and that the step's tokens (count per sequence, at positions[b] ...) fit the capacity,
        then counts the owned ones as held. Returns the sequences this rank owns a token of. A
        CUDA graph replays step_slots(); this runs before each replay."""
        if self._next_positions is not None and list(positions) != self._next_positions:
            raise ValueError(f"HelixKVCache: a step must decode the positions after the previous ones "
                             f"({self._next_positions}), got {list(positions)}")
        owned = [[p for p in range(start, start + count) if self.owns(p)] for start in positions]
        for b, mine in enumerate(owned):
            for position in mine:
                self._slot(b, position)  # the capacity check, before anything changes
        for b, mine in enumerate(owned):
            self._lengths[b] += len(mine)
        self._next_positions = [p + count for p in positions]
        self._step = (list(positions), count)
        return [b for b, mine in enumerate(owned) if mine]

    def rollback(self, kept: list[int]) -> None:
        """After a step of T tokens per sequence, keep the first kept[b] (1 <= kept[b] <= T) of
        sequence b's and drop the rest (rejected drafts): their owners count them as not held,
        and the next step starts after the kept ones. The dropped entries stay in their slots
        until the next tokens overwrite them; flash_decode never reads past seq_lens."""
        if self._step is None:
            raise RuntimeError("HelixKVCache: rollback needs a step to roll back")
        positions, count = self._step
        if len(kept) != len(positions) or any(not 1 <= k <= count for k in kept):
            raise ValueError(f"HelixKVCache: kept must hold one count in [1, {count}] per sequence, got {kept}")
        for b, (start, keep) in enumerate(zip(positions, kept)):
            self._lengths[b] -= sum(1 for p in range(start + keep, start + count) if self.owns(p))
        self._next_positions = [start + keep for start, keep in zip(positions, kept)]
        self._step = None
        if any(k != count for k in kept):  # the device copies only when something was dropped
            self.seq_lens.copy_(torch.tensor(self._lengths, dtype=torch.int32))
            self.positions.copy_(torch.tensor(self._next_positions, dtype=torch.int64))

    def step_slots(self, count: int = 1) -> StepSlots:
        """The step's device work, no host value in it (a CUDA graph captures it once): this
        step's positions (count per sequence, at positions[b] + [0, count)), then positions and
        seq_lens advance for the next; where each token goes (owned ones in their slots, the
        others in the trash block). A step of several tokens may cross a block boundary, so its
        tokens may have two owners; token i of sequence b then sees the shard's keys up to its
        own position: those held before the step plus this rank's share of tokens 0..i."""
        step_positions = self.positions.unsqueeze(1) + torch.arange(count, device=self.positions.device)  # [B, T]
        self.positions += count
        blocks = torch.div(step_positions, self.block_size, rounding_mode="floor")
        owned = (torch.remainder(blocks, self.kvp) == self.kvp_index).to(torch.int32)
        query_key_lens = None if count == 1 else self.seq_lens.unsqueeze(1) + owned.cumsum(1, dtype=torch.int32)
        self.seq_lens += owned.sum(1, dtype=torch.int32)
        local = torch.div(blocks, self.kvp, rounding_mode="floor").clamp(max=self.max_blocks - 1)
        mapped = self.block_table.gather(1, local).to(torch.int64)
        physical = torch.where(owned.bool(), mapped, torch.full_like(mapped, self.trash_block))
        return StepSlots(physical.flatten(), torch.remainder(step_positions, self.block_size).flatten(),
                         step_positions.flatten(), query_key_lens=query_key_lens)

    def held_keys(self, layer: int, sequence: int) -> torch.Tensor:
        """The K entries this rank holds of a sequence, in the shard's order: [held, H, Dk]."""
        count, blocks = self._lengths[sequence], self._table[sequence]
        rows = [self.keys[layer][blocks[i // self.block_size], i % self.block_size] for i in range(count)]
        return torch.stack(rows) if rows else self.keys[layer].new_zeros(0, *self.keys[layer].shape[2:])

    def write(self, layer: int, slots: StepSlots, keys: torch.Tensor, values: torch.Tensor | None) -> None:
        """Store this step's entries (keys [B * T, H, Dk], values [B * T, H, Dv]): owned tokens in their
        slots, the others in the trash block (one indexed write per tensor, no host loop)."""
        self.keys[layer][slots.physical, slots.offset] = keys.to(self.keys[layer].dtype)
        if self.values is not None:
            self.values[layer][slots.physical, slots.offset] = values.to(self.values[layer].dtype)
