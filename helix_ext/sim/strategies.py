"""Sharding strategies: their configurations and the time of one decode step under each.

Every strategy places one model instance on ``gpus`` GPUs of one NVLink domain (more GPUs are
replicas: they change neither throughput per GPU nor interactivity). Degrees:

  TP     attention and FFN tensor-parallel over all N GPUs (TP | query heads). TP > K KV heads
         duplicates the KV cache (every GPU of a KV head's group reads it all). MoE experts are
         TP-sharded N ways. Two all-reduces per layer.
  PP     PP stages x TP inside each stage. The batch runs as PP microbatches (the fewest that
         keep every stage busy; more would only shrink each stage's batch), so
         TTL = PP * (stage time of one microbatch + one hop) and the throughput is B / TTL.
         Stages hold ceil(L/PP) layers; the fullest stage sets the pace.
  EP     attention data-parallel (DP groups of TPA <= K GPUs, each serving B/DP requests),
         FFN over all N GPUs: MoE as TPF x EP experts with an all-to-all dispatch and combine;
         a dense FFN as TP = N with an all-gather of the tokens and a reduce-scatter.
  Medha  attention KVP x TP (sequence-sharded KV, TP | query heads), partials all-gathered
         inside each KVP group, exposed; o_proj and FFN TP over the TP group only, replicated
         across KVP groups (the FFN weights are read TP ways, never N ways).
  Helix  attention KVP x TPA (TPA <= K, no duplication), one all-to-all of partials inside each
         KVP group (HOP-B overlaps it with attention), then o_proj TP = N and an all-reduce;
         FFN dense TP = N, MoE TPF x EP = N, and an all-reduce.

TPA that does not divide the KV heads costs ceil(K/TPA) heads per GPU (the paper's formula);
every other dimension splits exactly (uneven shards of a few rows do not change a roofline).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from helix_ext.sim.costs import (ModelingOptions, all_gather_time, all_reduce_time, all_to_all_time,
                                 expected_distinct_experts, hopb_exchange_time, kernel_time, p2p_time)
from helix_ext.sim.hardware import HardwareSpec
from helix_ext.sim.models import ModelSpec

STRATEGIES = ("TP", "PP", "EP", "Medha", "Helix")
BASELINES = ("TP", "PP", "EP", "Medha")
HOPB_MODES = ("on", "off", "per-request")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Configs:
    """The configurations of one strategy, as parallel integer arrays (one entry per config).

    gpus = pp * (per-stage GPUs); attention uses per stage dpa * kvp * tpa GPUs, the FFN tpf * ep.
    """

    strategy: str
    gpus: np.ndarray
    pp: np.ndarray
    tpa: np.ndarray
    kvp: np.ndarray
    dpa: np.ndarray
    tpf: np.ndarray
    ep: np.ndarray

    def __len__(self) -> int:
        return len(self.gpus)

    def describe(self, i: int) -> str:
        g, pp, tpa, kvp, dpa, tpf, ep = (int(a[i]) for a in (self.gpus, self.pp, self.tpa, self.kvp, self.dpa,
                                                              self.tpf, self.ep))
        ffn = f"TPF={tpf}" + (f" x EP={ep}" if ep > 1 else "")
        if self.strategy == "TP":
            return f"TP={tpa}"
        if self.strategy == "PP":
            return f"PP={pp} x TP={tpa}"
        if self.strategy == "EP":
            return f"DP={dpa} x TPA={tpa} attention | FFN {ffn}"
        if self.strategy == "Medha":
            return f"KVP={kvp} x TP={tpa} attention | FFN TP={tpf} (x{kvp} replicas)"
        return f"KVP={kvp} x TPA={tpa} attention | FFN {ffn}"

    def as_dict(self, i: int) -> dict:
        return {"strategy": self.strategy, "gpus": int(self.gpus[i]), "pp": int(self.pp[i]), "tpa": int(self.tpa[i]),
                "kvp": int(self.kvp[i]), "dpa": int(self.dpa[i]), "tpf": int(self.tpf[i]), "ep": int(self.ep[i]),
                "layout": self.describe(i)}


def make_configs(strategy: str, model: ModelSpec, max_gpus: int) -> Configs:
    """Every configuration of ``strategy`` on 1..``max_gpus`` GPUs that the model's shapes allow."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    if max_gpus < 1:
        raise ValueError(f"max_gpus: expected >= 1, got {max_gpus}")
    heads_tp = [d for d in divisors(model.num_q_heads) if d <= max_gpus]
    kv_tp = [d for d in heads_tp if model.num_kv_heads % d == 0]

    def ffn_grids(n: int) -> list[tuple[int, int]]:  # (tpf, ep) with tpf * ep = n
        if not model.is_moe:
            return [(n, 1)]
        return [(n // ep, ep) for ep in divisors(n) if model.num_experts % ep == 0]

    rows = []  # (gpus, pp, tpa, kvp, dpa, tpf, ep)
    if strategy == "TP":
        rows = [(n, 1, n, 1, 1, n, 1) for n in heads_tp]
    elif strategy == "PP":
        rows = [(pp * tp, pp, tp, 1, 1, tp, 1) for pp in range(2, min(model.num_layers, max_gpus) + 1)
                for tp in heads_tp if pp * tp <= max_gpus]
    elif strategy == "EP":
        rows = [(dp * tpa, 1, tpa, 1, dp, tpf, ep) for tpa in kv_tp for dp in range(1, max_gpus // tpa + 1)
                for tpf, ep in ffn_grids(dp * tpa)]
    elif strategy == "Medha":
        rows = [(kvp * tp, 1, tp, kvp, 1, tp, 1) for tp in heads_tp for kvp in range(2, max_gpus // tp + 1)]
    elif strategy == "Helix":
        rows = [(kvp * tpa, 1, tpa, kvp, 1, tpf, ep) for tpa in kv_tp for kvp in range(1, max_gpus // tpa + 1)
                for tpf, ep in ffn_grids(kvp * tpa)]
    table = np.array(rows, dtype=np.int64).reshape(-1, 7)
    return Configs(strategy, *(table[:, j] for j in range(7)))


@dataclass(frozen=True)
class StepModel:
    """Times and memory of every (configuration, batch) pair of one strategy; arrays [configs, batches]."""

    ttl_s: np.ndarray
    memory_bytes: np.ndarray
    feasible: np.ndarray
    kv_bytes_per_gpu: np.ndarray
    weight_bytes_per_gpu: np.ndarray


def evaluate(model: ModelSpec, hw: HardwareSpec, configs: Configs, batch, context: float,
             options: ModelingOptions | None = None, hopb: str = "on") -> StepModel:
    """Token-to-token latency and per-GPU memory of every configuration at every batch size.

    ``hopb`` applies to Helix only ("on", "off" or "per-request", see costs.hopb_exchange_time).
    """
    options = options or ModelingOptions()
    if hopb not in HOPB_MODES:
        raise ValueError(f"hopb: expected one of {HOPB_MODES}, got {hopb!r}")
    if context <= 0:
        raise ValueError(f"context: expected > 0, got {context}")
    prec, mode = options.precision, options.kernel_time
    strategy = configs.strategy
    col = lambda a: np.asarray(a, dtype=float)[:, None]  # noqa: E731  (configs down, batches across)
    gpus, pp, tpa, kvp, dpa, tpf, ep = (col(a) for a in (configs.gpus, configs.pp, configs.tpa, configs.kvp,
                                                          configs.dpa, configs.tpf, configs.ep))
    batch = np.asarray(batch, dtype=float)[None, :]
    if np.any(batch < 1):
        raise ValueError("batch: every batch size must be >= 1")

    h, hq, k = model.hidden_size, model.num_q_heads, model.num_kv_heads
    act, lse = prec.activation_bytes, prec.lse_bytes
    rate = hw.flops(prec.compute)
    bw_attention = hw.hbm_bandwidth_bps * hw.attention_efficiency
    bw_gemm = hw.hbm_bandwidth_bps * hw.gemm_efficiency

    def gemm(params, tokens):
        return kernel_time(params * prec.weight_bytes, 2.0 * params * tokens, bw_gemm, rate, mode)

    stage_gpus = gpus / pp
    micro = np.ceil(batch / pp)               # requests per pipeline pass (the whole batch unless PP)
    attn_batch = np.ceil(micro / dpa)         # requests one attention group serves
    # Speculative decoding: every request runs `span` tokens through each layer per step (the
    # KV is read once for all of them); `micro_tokens` / `attn_tokens`: tokens, not requests.
    span = 1.0 + options.draft_tokens
    micro_tokens, attn_tokens = micro * span, attn_batch * span
    kv_heads = np.ceil(k / tpa)               # KV heads per GPU (> K/TPA: duplicated)
    q_heads = np.ceil(hq / tpa)
    o_split = stage_gpus if strategy == "Helix" else tpa
    ffn_group = tpf * ep                      # GPUs sharing one copy of the FFN weights

    # ---- attention phase
    # MLA's W_UV runs before the exchange on the attention heads ("value"), or after it with o_proj.
    uv_early = options.mla_exchange == "value"
    proj_params = (model.attn_replicated_params + model.attn_q_head_params * q_heads / hq
                   + kv_heads * model.attn_kv_head_params_per_head)
    t_uv_early = gemm(model.attn_uv_params * q_heads / hq, attn_tokens) if uv_early else 0.0
    t_proj = gemm(proj_params, attn_tokens)
    local_context = context / kvp
    kv_read = attn_batch * kv_heads * model.kv_elements_per_head * local_context * prec.kv_bytes
    attn_flops = attn_tokens * q_heads * local_context * model.attention_flops_per_head_token
    t_attn = kernel_time(kv_read, attn_flops, bw_attention, rate, mode)
    t_attn = t_attn + t_uv_early
    partial_width = model.value_dim if uv_early else model.attention_out_dim
    partial_bytes = micro_tokens * q_heads * (partial_width * act + lse)  # one rank's partials, whole batch
    if strategy == "Helix":
        exchange_bytes = np.where(kvp > 1, partial_bytes * (kvp - 1) / kvp, 0.0)
        t_attn = hopb_exchange_time(t_attn, exchange_bytes, hw, micro, hopb, options.max_hopb_chunks)
    elif strategy == "Medha":
        t_attn = t_attn + all_gather_time(hw, kvp, partial_bytes * kvp)
    o_tokens = micro_tokens if strategy in ("Helix", "Medha") else attn_tokens
    o_params = (model.o_proj_params + (0 if uv_early else model.attn_uv_params)) / o_split
    t_o = gemm(o_params, o_tokens)
    ar_ranks = stage_gpus if strategy == "Helix" else tpa
    t_o = t_o + all_reduce_time(hw, ar_ranks, o_tokens * h * act)
    attention_part = t_proj + t_attn + t_o

    # ---- FFN phase (tokens: the whole (micro)batch; Medha's KVP groups each run it all)
    ffn_all_reduce = all_reduce_time(hw, ffn_group, micro_tokens * h * act)
    dense_time = gemm(model.dense_ffn_params / ffn_group, micro_tokens)
    if strategy == "EP":  # tokens from every DP group gathered for TP = N, then scattered back
        dense_time = dense_time + 2 * all_gather_time(hw, stage_gpus, micro_tokens * h * act)
    else:
        dense_time = dense_time + ffn_all_reduce
    if model.is_moe:
        experts_on_gpu = np.ceil(model.num_experts / ep)
        read = expected_distinct_experts(experts_on_gpu, model.num_experts, model.top_k, micro_tokens)
        routed = kernel_time(read * model.expert_params / tpf * prec.weight_bytes,
                             2.0 * micro_tokens * model.top_k * model.expert_params / ffn_group, bw_gemm, rate, mode)
        shared = gemm(model.num_shared_experts * model.expert_params / ffn_group, micro_tokens)
        router_tokens = attn_tokens / tpa if strategy == "EP" else micro_tokens
        moe_time = routed + shared + gemm(model.router_params, router_tokens)
        if strategy == "EP":  # all-to-all dispatch and combine; at most an all-gather's volume
            sent = (np.minimum(micro_tokens * model.top_k * tpf / stage_gpus, micro_tokens) * (stage_gpus - 1)
                    / stage_gpus * h * act)
            moe_time = moe_time + 2 * all_to_all_time(hw, stage_gpus, sent)
        else:
            moe_time = moe_time + ffn_all_reduce
    else:
        moe_time = np.zeros_like(dense_time)

    step = model.num_dense_layers * (attention_part + dense_time) + model.num_moe_layers * (attention_part + moe_time)
    layers_per_stage = np.ceil(model.num_layers / pp)
    hop = np.where(pp > 1, p2p_time(hw, micro_tokens * h * act), 0.0)
    # Token-to-token latency: a step's time over the tokens it produces per request.
    ttl = pp * (step * layers_per_stage / model.num_layers + hop) / options.accepted_per_step

    # ---- memory per GPU (the fullest pipeline stage)
    attn_weights = proj_params + (model.attn_uv_params * q_heads / hq if uv_early else 0.0) + o_params
    dense_weights = model.dense_ffn_params / ffn_group
    moe_weights = (np.ceil(model.num_experts / ep) * model.expert_params / tpf
                   + model.num_shared_experts * model.expert_params / ffn_group + model.router_params)
    moe_layers = np.minimum(model.num_moe_layers, layers_per_stage)
    dense_layers = layers_per_stage - moe_layers
    weights = (layers_per_stage * attn_weights + dense_layers * dense_weights
               + (moe_layers * moe_weights if model.is_moe else 0.0)) * prec.weight_bytes
    held_requests = np.ceil(batch / dpa)
    kv = held_requests * layers_per_stage * kv_heads * model.kv_elements_per_head * local_context * prec.kv_bytes
    weights = np.broadcast_to(weights, ttl.shape)
    memory = weights + kv
    return StepModel(ttl_s=ttl, memory_bytes=memory, feasible=memory <= hw.usable_hbm_bytes,
                     kv_bytes_per_gpu=kv, weight_bytes_per_gpu=weights)
