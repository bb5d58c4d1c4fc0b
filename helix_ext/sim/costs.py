"""The roofline-plus-communication cost of one decoder layer, and the paper's Appendix A formulas.

Modeling choices (each a decision the paper leaves open; why in one line each):

- Precision: FP4 weights, FP4 KV cache and FP4 arithmetic, as the paper simulates. Bytes per
  element are 0.5, as in the paper's formulas; NVFP4's block scales (one byte per 16 elements,
  +12.5%) are left out like the paper leaves them out (``Precision.weight_bytes`` can say 0.5625).
  Activations that cross NVLink (hidden states, partial attention outputs) travel in BF16 and
  LSEs in FP32: collectives do not reduce FP4, and the merge needs the partials' precision.
- One kernel costs max(memory time, compute time): decode kernels stream their operands through
  shared memory while the tensor cores work on the previous tile, so the two overlap. This
  matters for MLA: at 1M context the absorbed decode attention of DeepSeek-R1 does ~970 FLOP per
  KV byte in FP4 against a ridge of 1250 FLOP/byte on GB200 (10 PFLOP/s / 8 TB/s), so it is
  memory-bound by only ~25%; costing it as the *sum* would nearly double attention time
  (``ModelingOptions(kernel_time="sum")`` shows that bound). Kernels of one layer run one after
  another (their times add).
- Collectives: latency + bytes / bandwidth with ring factors: all-reduce of m bytes over p ranks
  moves 2(p-1)/p m per rank, all-gather and reduce-scatter (p-1)/p m, an all-to-all sends the
  (p-1)/p of each rank's data that leaves it, a pipeline hop sends m. NVSwitch puts every peer
  one hop away at the full per-direction NVLink bandwidth. One latency for every collective.
- MoE expert weight reads: tokens route uniformly at random (a balanced router), so a GPU
  holding e of the E experts reads e (1 - (1 - k/E)^T) distinct experts for T tokens in
  expectation, and never less than one expert (some GPU always reads one: it sets the pace).
  Expert FLOPs spread evenly. Shared experts are TP-sharded over the FFN's GPUs.
- The Helix exchange carries, per token and query head, the partial output plus one FP32
  LSE. For MLA the partial is taken after W_UV (v_head_dim = 128 wide for DeepSeek-R1): the
  paper gives the exchange volume as B x H x D with D the head dim, and W_UV being linear it
  commutes with the merge. Each KVP rank then applies W_UV to all its query heads before the
  exchange (modeled: +4.5% attention weight reads for DeepSeek-R1). helix_ext.parallel today
  exchanges the 512-wide latent and applies W_UV after the merge (4x the traffic);
  ``ModelingOptions(mla_exchange="latent")`` models that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from helix_ext.sim.hardware import HardwareSpec
from helix_ext.sim.models import ModelSpec


@dataclass(frozen=True)
class Precision:
    """Bytes per element and the arithmetic precision (the paper: FP4 everything)."""

    weight_bytes: float = 0.5
    kv_bytes: float = 0.5
    compute: str = "fp4"
    activation_bytes: float = 2.0
    lse_bytes: float = 4.0


FP4 = Precision()


@dataclass(frozen=True)
class ModelingOptions:
    """Switches of the cost model.

    kernel_time: "max" (memory and compute overlap inside a kernel, the default) or "sum".
    max_hopb_chunks: HOP-B tries every chunk count n from 1 to min(batch, this) per
      configuration and keeps the fastest (n = 1 is no overlap, so HOP-B never hurts).
    mla_exchange: what an MLA model's KVP exchange carries per (token, query head):
      "value" (the default: v_head_dim wide, the paper's B x H x D; every KVP rank applies W_UV
      to all of its heads before the exchange) or "latent" (kv_lora_rank wide, 4x the traffic
      for DeepSeek; W_UV runs after the merge on the TP = N head slice, as helix_ext.parallel
      does today).
    draft_tokens, accepted_per_step: speculative decoding. Each step runs 1 + draft_tokens
      tokens per request through every layer (the projections, FFN, exchange and all-reduces
      carry that many tokens; attention reads each request's KV once for all of them, with that
      many times the FLOPs) and produces accepted_per_step of them on average (in [1, 1 +
      draft_tokens]), so the token-to-token latency is the step time / accepted_per_step.
      0 drafts (the default): plain decoding.
    """

    precision: Precision = field(default_factory=Precision)
    kernel_time: str = "max"
    max_hopb_chunks: int = 32
    mla_exchange: str = "value"
    draft_tokens: int = 0
    accepted_per_step: float = 1.0

    def __post_init__(self):
        if self.kernel_time not in ("max", "sum"):
            raise ValueError(f"kernel_time: expected 'max' or 'sum', got {self.kernel_time!r}")
        if self.mla_exchange not in ("latent", "value"):
            raise ValueError(f"mla_exchange: expected 'latent' or 'value', got {self.mla_exchange!r}")
        if self.max_hopb_chunks < 1:
            raise ValueError(f"max_hopb_chunks: expected >= 1, got {self.max_hopb_chunks}")
        if self.draft_tokens < 0:
            raise ValueError(f"draft_tokens: expected >= 0, got {self.draft_tokens}")
        if not 1.0 <= self.accepted_per_step <= 1 + self.draft_tokens:
            raise ValueError(f"accepted_per_step: expected in [1, 1 + draft_tokens = {1 + self.draft_tokens}] (tokens "
                             f"a step produces per request), got {self.accepted_per_step}")


# ------------------------------------------------------------------------------ Appendix A
def appendix_a_kv_time(model: ModelSpec, batch, context, tpa, kvp, bytes_per_element: float,
                       mem_bw: float):
    """Paper, Appendix A: T_KV = B * 2 * ceil(K/TPA) * Hsz * S * bytes / (KVP * MemBW), one layer.

    For MLA, 2 * Hsz (K and V of one head) becomes the latent entry, kv_lora_rank + rope dim.
    """
    kv_heads = np.ceil(model.num_kv_heads / np.asarray(tpa, dtype=float))
    return (np.asarray(batch, dtype=float) * kv_heads * model.kv_elements_per_head * np.asarray(context, dtype=float)
            * bytes_per_element / (np.asarray(kvp, dtype=float) * mem_bw))


def appendix_a_weight_time(model: ModelSpec, tpa, tpf, bytes_per_element: float, mem_bw: float):
    """Paper, Appendix A: T_W = (2H(Q/TPA)Hsz + 2H ceil(K/TPA) Hsz + 3HF/TPF) * bytes / MemBW.

    Written for a dense GQA layer (Q and O projections split by TPA, K/V by KV head, FFN by TPF).
    """
    if model.attention != "gqa" or model.is_moe:
        raise ValueError("appendix_a_weight_time: the paper's formula is for a dense GQA layer")
    h, q, k, hsz, f = model.hidden_size, model.num_q_heads, model.num_kv_heads, model.head_dim, model.ffn_dim
    tpa = np.asarray(tpa, dtype=float)
    params = 2 * h * (q / tpa) * hsz + 2 * h * np.ceil(k / tpa) * hsz + 3 * h * f / np.asarray(tpf, dtype=float)
    return params * bytes_per_element / mem_bw


# ------------------------------------------------------------------------------ collectives
def all_reduce_time(hw: HardwareSpec, ranks, nbytes):
    ranks = np.asarray(ranks, dtype=float)
    t = hw.collective_latency_s + 2 * (ranks - 1) / ranks * nbytes / hw.link_bandwidth_bps
    return np.where(ranks > 1, t, 0.0)


def all_gather_time(hw: HardwareSpec, ranks, total_bytes):
    """All-gather (or reduce-scatter) whose full result is ``total_bytes``."""
    ranks = np.asarray(ranks, dtype=float)
    t = hw.collective_latency_s + (ranks - 1) / ranks * total_bytes / hw.link_bandwidth_bps
    return np.where(ranks > 1, t, 0.0)


def all_to_all_time(hw: HardwareSpec, ranks, bytes_leaving_rank):
    ranks = np.asarray(ranks, dtype=float)
    return np.where(ranks > 1, hw.collective_latency_s + bytes_leaving_rank / hw.link_bandwidth_bps, 0.0)


def p2p_time(hw: HardwareSpec, nbytes):
    return hw.collective_latency_s + nbytes / hw.link_bandwidth_bps


# ------------------------------------------------------------------------------ kernels
def kernel_time(nbytes, flops, bandwidth: float, flops_rate: float, mode: str = "max"):
    memory, compute = nbytes / bandwidth, flops / flops_rate
    return np.maximum(memory, compute) if mode == "max" else memory + compute


def expected_distinct_experts(experts_on_gpu, num_experts: int, top_k: int, tokens):
    """Expected distinct experts, among ``experts_on_gpu`` of ``num_experts``, that ``tokens`` tokens
    activate with uniform top-k routing; floored at one (the busiest GPU reads at least one)."""
    tokens = np.asarray(tokens, dtype=float)
    mean = experts_on_gpu * (1.0 - (1.0 - top_k / num_experts) ** tokens)
    return np.where(tokens > 0, np.maximum(mean, 1.0), 0.0)


def hopb_exchange_time(attention_time, exchange_bytes, hw: HardwareSpec, batch, mode: str, max_chunks: int):
    """Attention plus the Helix exchange of one layer, exposed time.

    mode "on":  HOP-B, n chunks of the batch: chunk c's exchange overlaps chunk c+1's attention;
                time max(n t_c + t_m, t_c + n t_m) with t_c = T_attn / n and t_m = latency +
                bytes / (n BW); the best n in 1..min(batch, max_chunks). Overlap hides the
                bandwidth part of the exchange, never the latency of the last chunk's.
    mode "off": the exchange runs after all attention, one collective: T_attn + latency + bytes/BW.
    mode "per-request": the paper's Figure 3 reading of "off": every request's exchange is its
                own collective, issued after its attention, never overlapped:
                T_attn + batch * latency + bytes / BW.
    ``exchange_bytes`` == 0 means no exchange (KVP = 1).
    """
    lat, bw = hw.collective_latency_s, hw.link_bandwidth_bps
    has_exchange = exchange_bytes > 0
    if mode == "off":
        t = attention_time + lat + exchange_bytes / bw
    elif mode == "per-request":
        t = attention_time + batch * lat + exchange_bytes / bw
    elif mode == "on":
        chunks = np.arange(1, max_chunks + 1, dtype=float)
        t_att, v, b = (np.asarray(a, dtype=float)[..., None] for a in (attention_time, exchange_bytes, batch))
        pipelined = np.maximum(t_att + lat + v / (chunks * bw), t_att / chunks + chunks * lat + v / bw)
        pipelined = np.where(chunks <= np.maximum(b, 1.0), pipelined, np.inf)
        t = pipelined.min(axis=-1)
    else:
        raise ValueError(f"mode: expected 'on', 'off' or 'per-request', got {mode!r}")
    return np.where(has_exchange, t, attention_time)
