"""Helix parallel configuration and the rank layout.

Attention runs on N = KVP x TPA ranks: TPA splits the KV heads (and their query heads), KVP
splits the sequence. The FFN reuses the same N ranks: a dense FFN as TP = N, an MoE FFN as a
TPF x EP grid. KVP ranks of one TPA group are consecutive: rank r has tpa index r // kvp and
kvp index r % kvp. In the MoE grid the TPF ranks of one expert group are consecutive: ep
index r // tpf, tpf index r % tpf.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from helix_ext.reference import FP4_BLOCK


class HelixConfigError(ValueError):
    """An invalid Helix configuration; the message names the constraint that fails."""


@dataclass(frozen=True)
class HelixConfig:
    kvp: int = 1                 # KV (sequence) parallel ranks per TPA group
    tpa: int = 1                 # tensor parallel ranks over KV heads in attention
    tpf: int | None = None       # tensor parallel ranks inside an expert (MoE FFN); default N / ep
    ep: int = 1                  # expert parallel groups (MoE FFN)
    tokens_per_block: int = 16   # KV round-robin unit = paged cache block size
    exchange: str = "nccl"       # "nccl": torch.distributed all-to-all (NCCL on GPUs, gloo on CPU);
                                 # "fused": peers' partials read in place (symmetric / shared memory)
    hopb_chunks: int = 1         # HOP-B: batch chunks whose exchange overlaps the next's attention (1 = off)
    exchange_timeout_s: float = 60.0  # a peer silent this long fails the step ("fused"; any step with cuda_graphs)
    cuda_graphs: bool = False    # GPU ranks on NCCL: the decode step captured once, then replayed

    @property
    def world_size(self) -> int:
        return self.kvp * self.tpa

    @property
    def ffn_tp(self) -> int:
        return self.tpf if self.tpf is not None else self.world_size // self.ep

    def validate(self, num_q_heads: int, num_kv_heads: int, moe: bool, num_experts: int = 0) -> None:
        """Raise HelixConfigError naming the first constraint this config breaks for a model."""
        for name in ("kvp", "tpa", "ep", "tokens_per_block", "hopb_chunks"):
            if getattr(self, name) < 1:
                raise HelixConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tpa > num_kv_heads:
            raise HelixConfigError(f"tpa ({self.tpa}) must be <= the number of KV heads ({num_kv_heads}): "
                                   "beyond that TP duplicates the KV cache (use kvp instead)")
        if num_kv_heads % self.tpa:
            raise HelixConfigError(f"tpa ({self.tpa}) must divide the number of KV heads ({num_kv_heads})")
        if self.exchange not in ("nccl", "fused"):
            raise HelixConfigError(f"exchange must be 'nccl' or 'fused', got {self.exchange!r}")
        if moe:
            if self.ffn_tp < 1 or self.ffn_tp * self.ep != self.world_size:
                raise HelixConfigError(f"tpf x ep ({self.ffn_tp} x {self.ep}) must equal kvp x tpa = {self.world_size}")
            if num_experts % self.ep:
                raise HelixConfigError(f"ep ({self.ep}) must divide the number of experts ({num_experts})")
        elif self.ep != 1 or (self.tpf is not None and self.tpf != self.world_size):
            raise HelixConfigError(f"a dense FFN runs TP = N = {self.world_size}: ep must be 1 and tpf unset or "
                                   f"{self.world_size}")

    def validate_model(self, model) -> None:
        """validate() for a ModelConfig, plus what its FFN shards need, so that every layout the
        decoder's constructor would refuse is refused here, before any rank starts: FP4 weights
        quantize along the hidden size and split in whole quantization blocks, and each TPF rank
        of an FP4 MoE holds at least one block of every expert."""
        moe = model.num_experts > 0
        self.validate(model.num_q_heads, model.attention_kv_heads, moe, model.num_experts)
        formats = []
        if moe and model.expert_format in FP4_BLOCK:
            formats.append(("experts", model.expert_format, model.moe_ffn_dim, self.ffn_tp, "tpf"))
        if model.ffn_format in FP4_BLOCK and (not moe or model.first_dense_layers > 0):
            formats.append(("dense FFN", model.ffn_format, model.ffn_dim, None, None))
        for what, fmt, ffn_dim, parts, parts_name in formats:
            block = FP4_BLOCK[fmt]
            if model.hidden_size % block or ffn_dim % block:
                raise HelixConfigError(f"{fmt} {what}: the hidden size ({model.hidden_size}) and the FFN dim "
                                       f"({ffn_dim}) must be multiples of the {fmt} block ({block})")
            if parts is not None and ffn_dim // block < parts:
                raise HelixConfigError(f"{fmt} {what}: the FFN dim ({ffn_dim}) is {ffn_dim // block} blocks of "
                                       f"{block}, fewer than {parts_name} = {parts} ranks to split it over in "
                                       f"whole blocks (use fewer {parts_name} ranks, e.g. a larger ep)")


def default_layout(world_size: int, num_kv_heads: int, kvp: int | None = None,
                   tpa: int | None = None) -> tuple[int, int]:
    """(kvp, tpa) for world_size ranks when the user gave one or neither: the given one fixes
    the other (world_size / it); with neither, TPA takes the largest count that divides both the
    KV heads and the world size (1 for MLA's single latent head) and KVP the rest."""
    if world_size < 1:
        raise HelixConfigError(f"the world size must be >= 1, got {world_size}")
    given = {"kvp": kvp, "tpa": tpa}
    for name, value in given.items():
        if value is not None and (value < 1 or world_size % value):
            raise HelixConfigError(f"{name} ({value}) must divide the world size ({world_size})")
    if kvp is not None and tpa is not None:
        return kvp, tpa
    if kvp is not None:
        return kvp, world_size // kvp
    if tpa is not None:
        return world_size // tpa, tpa
    tpa = max(d for d in range(1, max(1, num_kv_heads) + 1) if num_kv_heads % d == 0 and world_size % d == 0)
    return world_size // tpa, tpa


def even_split(total: int, parts: int) -> list[int]:
    """Sizes of `parts` near-equal pieces of `total` (the first ones one larger)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def split_offsets(sizes: list[int]) -> list[int]:
    offsets, running = [], 0
    for size in sizes:
        offsets.append(running)
        running += size
    return offsets


@dataclass(frozen=True)
class RankLayout:
    """Where one rank sits in each phase, and which heads / columns / experts it owns."""

    rank: int
    config: HelixConfig
    num_q_heads: int
    num_kv_heads: int
    tpa_index: int = field(init=False)
    kvp_index: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "tpa_index", self.rank // self.config.kvp)
        object.__setattr__(self, "kvp_index", self.rank % self.config.kvp)

    # Attention: the TPA group's KV heads and query heads (replicated over its KVP ranks).
    @property
    def kv_heads(self) -> range:
        per_group = self.num_kv_heads // self.config.tpa
        return range(self.tpa_index * per_group, (self.tpa_index + 1) * per_group)

    @property
    def q_heads(self) -> range:
        group = self.num_q_heads // self.num_kv_heads
        return range(self.kv_heads.start * group, self.kv_heads.stop * group)

    # Exchange: the TPA group's query heads dealt over its KVP ranks (as evenly as possible);
    # after the merge the rank owns exchange_heads(kvp_index), globally numbered.
    def exchange_head_counts(self) -> list[int]:
        return even_split(len(self.q_heads), self.config.kvp)

    @property
    def merged_heads(self) -> range:
        counts = self.exchange_head_counts()
        start = self.q_heads.start + split_offsets(counts)[self.kvp_index]
        return range(start, start + counts[self.kvp_index])

    def kvp_group_ranks(self) -> list[int]:
        return list(range(self.tpa_index * self.config.kvp, (self.tpa_index + 1) * self.config.kvp))

    def owns_block(self, block_index: int) -> bool:
        """KV round-robin: logical block b of a sequence lives on KVP rank b % kvp."""
        return block_index % self.config.kvp == self.kvp_index

    # FFN: dense TP = N column slice, or the MoE (ep, tpf) cell.
    @property
    def ep_index(self) -> int:
        return self.rank // self.config.ffn_tp

    @property
    def tpf_index(self) -> int:
        return self.rank % self.config.ffn_tp

    def ffn_slice(self, ffn_dim: int, parts: int, index: int, granule: int = 1) -> range:
        """Part `index` of `parts` near-equal slices of the FFN dim, made of whole `granule`s
        (FP4: quantization blocks); ranks past the last granule get an empty slice."""
        if ffn_dim % granule:
            raise HelixConfigError(f"the FFN dim ({ffn_dim}) must be a multiple of {granule} to be split in "
                                   f"whole blocks of {granule}")
        sizes = [units * granule for units in even_split(ffn_dim // granule, parts)]
        start = split_offsets(sizes)[index]
        return range(start, start + sizes[index])

    def local_experts(self, num_experts: int) -> range:
        per_group = num_experts // self.config.ep
        return range(self.ep_index * per_group, (self.ep_index + 1) * per_group)
