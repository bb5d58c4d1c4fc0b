"""One rank's share of a model decoding under Helix parallelism.

Per layer and decode step:
  attention on N = KVP x TPA ranks: the rank's TPA group computes Q/K/V of its KV heads and
    their query heads (replicated on the group's KVP ranks), applies RoPE, appends the new
    token's KV on the owner rank only (round-robin by block), runs flash_decode over its KV
    shard, and exchanges partial outputs + LSEs inside the KVP group (one all-to-all, then
    merge_states for the query heads this rank owns after the exchange);
  the output projection runs TP = N over those heads, then an all-reduce;
  the FFN reuses the N ranks: dense SwiGLU as TP = N, MoE as TPF x EP (router replicated, each
    rank computing its experts' FFN slices for the tokens routed to them), then an all-reduce.
HOP-B splits the batch into chunks and starts chunk c's exchange before computing chunk
c+1's attention; the projections run on the whole batch, so results are the same bits with
HOP-B on or off.

A step is host bookkeeping in Python ints (the KV cache's ownership and capacity checks) and
then device work that takes no host value (positions, lengths, slots, RoPE, the exchange's
epochs all live on the device). With HelixConfig.cuda_graphs the device work is captured in a
CUDA graph at the second step (the first, eager, warms up: NCCL communicators, cuBLAS handles)
and replayed from then on; the input tokens go through a static buffer.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

from helix_ext.moe import moe_ffn
from helix_ext.ops import flash_decode
from helix_ext.parallel.config import HelixConfig, RankLayout, even_split, split_offsets
from helix_ext.parallel.device import runtime
from helix_ext.parallel.exchange import make_exchange
from helix_ext.parallel.experts import local_experts, route
from helix_ext.parallel.ffn import DenseFfn, ffn_granule
from helix_ext.parallel.kv_cache import HelixKVCache
from helix_ext.parallel.launch import collective_timeout
from helix_ext.parallel.models import (ModelConfig, context_block, make_weights, mla_query_and_entry, rms_norm,
                                       rope_cos_sin, rope_inverse_frequencies, rotate, swiglu)


# Process-group backends whose collectives a CUDA graph can capture ("fake": the GPU dry run).
CUDA_GRAPH_BACKENDS = ("nccl", "fake")


def check_cuda_graphs(config: HelixConfig, backend: str) -> None:
    """Raise ValueError when config asks for CUDA graphs on ranks that cannot capture them."""
    if config.cuda_graphs and backend not in CUDA_GRAPH_BACKENDS:
        raise ValueError(f"cuda_graphs needs ranks on GPUs with one process each (NCCL); these ranks run over "
                         f"{backend!r} (CPU ranks have no graphs; threaded ranks' collectives run on the host, "
                         "outside any graph)")


class HelixGroups:
    """The process groups of a Helix layout, built once, in the same order on every rank."""

    def __init__(self, config: HelixConfig, rank: int):
        self.world = dist.group.WORLD
        self.kvp_groups = []
        timeout = collective_timeout()  # as the world's: a peer that failed ends the wait in time
        for t in range(config.tpa):
            self.kvp_groups.append(dist.new_group(list(range(t * config.kvp, (t + 1) * config.kvp)), timeout=timeout))
        self.kvp = self.kvp_groups[rank // config.kvp]


class PhaseTimers:
    """Seconds per phase. On the CPU, wall clock around each phase. On GPUs, a pair of CUDA
    events recorded on the current stream around it: nothing waits for the device inside a
    step (HOP-B's chunks keep overlapping); the events are read when `seconds` is, after the
    steps (a phase's time is then the GPU time between its events on the compute stream)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._seconds: dict[str, float] = {}
        self._pending: list[tuple[str, object, object]] = []  # (phase, start event, end event)

    @contextmanager
    def phase(self, name: str):
        if self.device.type == "cuda" and runtime().capturing():
            yield  # inside a CUDA graph capture: the replay is timed whole (phase "graph")
            return
        if self.device.type == "cuda":
            start_event, end_event = runtime().new_event(timing=True), runtime().new_event(timing=True)
            start_event.record()
            try:
                yield
            finally:
                end_event.record()
                self._pending.append((name, start_event, end_event))
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - start

    @property
    def seconds(self) -> dict[str, float]:
        """Seconds per phase so far (on GPUs this waits for the recorded events: read it after
        the steps, not inside one)."""
        for name, start_event, end_event in self._pending:
            end_event.synchronize()
            self._seconds[name] = self._seconds.get(name, 0.0) + start_event.elapsed_time(end_event) / 1000.0
        self._pending = []
        return self._seconds


class HelixDecoder:
    """The rank's shards of every weight, its KV cache shard, and the decode step."""

    def __init__(self, model: ModelConfig, config: HelixConfig, rank: int, groups: HelixGroups,
                 context_lengths: list[int], max_new_tokens: int, device: torch.device,
                 weights: dict | None = None, context=None, max_step_tokens: int = 1):
        """max_step_tokens: the most tokens a step takes per sequence (speculative decoding: the
        last accepted token and up to max_step_tokens - 1 drafts; the cache keeps room for the
        drafts of the last step beyond max_new_tokens).
        weights: the whole model's weights by helix name (default: drawn from model.seed),
        with optional precomputed FP4 FFN codes under "layers.{i}.ffn.fp4"; context(layer,
        sequence, block) -> (keys [n, Hkv, Dk], values [n, Hkv, Dv] or None) of all KV heads
        (default: synthesized), e.g. a prefill's cache; only the blocks this rank owns are asked for."""
        config.validate_model(model)
        check_cuda_graphs(config, dist.get_backend() if device.type == "cuda" else "cpu")
        if dist.get_world_size() != config.world_size:
            raise ValueError(f"the process group has {dist.get_world_size()} ranks, the Helix config needs "
                             f"kvp x tpa = {config.world_size}")
        if max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be >= 1, got {max_step_tokens}")
        self.model, self.config, self.rank, self.groups, self.device = model, config, rank, groups, device
        self.max_step_tokens = max_step_tokens
        self._graph_step_tokens = None  # cuda_graphs: the tokens per sequence the graph was captured for
        self.layout = RankLayout(rank, config, model.num_q_heads, model.attention_kv_heads)
        self.timers = PhaseTimers(device)
        full = weights if weights is not None else make_weights(model)
        full = {k: v.to(model.dtype) if isinstance(v, torch.Tensor) else v for k, v in full.items()}
        self.w = self._shard(full)
        dim_k, dim_v = model.cache_head_dims
        self.cache = HelixKVCache(
            num_layers=model.num_layers, batch=len(context_lengths), num_kv_heads=len(self.layout.kv_heads),
            head_dim_k=dim_k, head_dim_v=None if model.mla else dim_v, block_size=config.tokens_per_block,
            kvp=config.kvp, kvp_index=self.layout.kvp_index,
            capacity_tokens=[n + max_new_tokens + max_step_tokens - 1 for n in context_lengths], dtype=model.dtype,
            device=device)
        kv = self.layout.kv_heads

        def synthesized(layer, sequence, block):
            return context_block(model, layer, sequence, block, context_lengths[sequence], config.tokens_per_block)

        source = context or synthesized

        def local_block(layer, sequence, block):
            keys, values = source(layer, sequence, block)
            return keys[:, kv.start:kv.stop], None if values is None else values[:, kv.start:kv.stop]

        self.cache.load_context(context_lengths, local_block)
        rope_dim = model.qk_rope_head_dim if model.mla else model.head_dim
        self.rope_inverse = rope_inverse_frequencies(rope_dim, model.rope_theta).to(device)  # set-up: copied once
        # cuda_graphs: the first step runs eagerly on the capture stream, the second is captured.
        self._graph_stream = self._graph = self._tokens = self._logits = None
        self._bytes_per_step = 0
        self._replays: list = []  # events of the replays in flight (at most two)
        self.exchange = make_exchange(config.exchange, self.layout.exchange_head_counts(), self.layout.kvp_index,
                                      groups.kvp, max_batch=len(context_lengths) * max_step_tokens, head_dim=dim_v,
                                      dtype=model.dtype,
                                      device=device, max_chunks=config.hopb_chunks, timeout_s=config.exchange_timeout_s)
        # The TP all-reduces: over the same peer memory as the fused exchange, else a collective.
        self.peer_all_reduce = None
        if config.exchange == "fused":
            from helix_ext.parallel.fused_exchange import PeerAllReduce

            self.peer_all_reduce = PeerAllReduce(groups.world, rank, config.world_size,
                                                 len(context_lengths) * max_step_tokens * model.hidden_size,
                                                 model.dtype, device,
                                                 config.exchange_timeout_s, self.exchange.error[1:])

    # ------------------------------------------------------------------ weight shards
    def _shard(self, full: dict[str, torch.Tensor]) -> dict:
        m, lay, n = self.model, self.layout, self.config.world_size
        q, kv, merged = lay.q_heads, lay.kv_heads, lay.merged_heads
        dev = self.device
        w = {name: full[name].to(dev) for name in ("embed", "final_norm")}
        # The LM head sharded over the vocabulary: rows [r * V', (r + 1) * V') on rank r, V' =
        # ceil(V / N), the last shard padded with zero rows (their logits are cut after the gather).
        shard = -(-full["lm_head"].shape[0] // n)
        rows = full["lm_head"][self.rank * shard:(self.rank + 1) * shard]
        if rows.shape[0] < shard:
            rows = torch.cat([rows, rows.new_zeros(shard - rows.shape[0], rows.shape[1])])
        w["lm_head"] = rows.contiguous().to(dev)
        for layer in range(m.num_layers):
            p = f"layers.{layer}."
            for name in ("attn_norm", "ffn_norm"):
                w[p + name] = full[p + name].to(dev)
            if m.mla:
                for name in ("wq", "w_dkv", "w_kr", "kv_norm", "w_uk"):
                    w[p + name] = full[p + name].to(dev)  # TPA = 1 for MLA: all query heads locally
                w[p + "w_uv"] = full[p + "w_uv"][merged.start:merged.stop].to(dev)
                head_v = m.v_head_dim
            else:
                d = m.head_dim
                # Q, K and V of the rank's heads as one matrix: one GEMM per layer (the same bits).
                w[p + "wqkv"] = torch.cat([full[p + "wq"][q.start * d:q.stop * d],
                                           full[p + "wk"][kv.start * d:kv.stop * d],
                                           full[p + "wv"][kv.start * d:kv.stop * d]]).to(dev)
                head_v = d
            w[p + "wo"] = full[p + "wo"][:, merged.start * head_v:merged.stop * head_v].contiguous().to(dev)
            if m.is_moe_layer(layer):
                w[p + "router"] = full[p + "router"].to(dev)
                ffn = lay.ffn_slice(m.moe_ffn_dim, self.config.ffn_tp, lay.tpf_index, ffn_granule(m.expert_format))
                experts = lay.local_experts(m.num_experts)
                w[p + "experts"] = local_experts(m, full, p, experts, ffn, dev)
                w[p + "experts.first"] = experts.start
                shared = lay.ffn_slice(m.moe_ffn_dim * m.num_shared_experts, n, self.rank)
                w[p + "shared.gate"] = full[p + "shared.gate"][shared.start:shared.stop].to(dev)
                w[p + "shared.up"] = full[p + "shared.up"][shared.start:shared.stop].to(dev)
                w[p + "shared.down"] = full[p + "shared.down"][:, shared.start:shared.stop].contiguous().to(dev)
            else:
                cols = lay.ffn_slice(m.ffn_dim, n, self.rank, ffn_granule(m.ffn_format))
                w[p + "ffn"] = DenseFfn.from_full(m.ffn_format, full[p + "ffn.gate"], full[p + "ffn.up"],
                                                  full[p + "ffn.down"], cols, dev, full.get(p + "ffn.fp4"))
        return w

    # ------------------------------------------------------------------ attention
    def _qkv(self, layer: int, h: torch.Tensor, positions: torch.Tensor, rope):
        """(queries [B * T, Hq_local, Dk], keys [B * T, Hkv_local, Dk], values or None) of the new tokens;
        rope: the step's (cos, sin) tables (rope_cos_sin), shared by every layer."""
        m, w, p = self.model, self.w, f"layers.{layer}."
        if m.mla:
            query, entry = mla_query_and_entry(m, w, p, h, positions, range(m.num_q_heads), self.rope_inverse)
            return query, entry, None
        d, batch = m.head_dim, h.shape[0]
        q_heads, kv_heads = len(self.layout.q_heads), len(self.layout.kv_heads)
        qkv = F.linear(h, w[p + "wqkv"])
        rotated = rotate(qkv[:, :(q_heads + kv_heads) * d].view(batch, -1, d), *rope)  # Q and K at once
        return rotated[:, :q_heads], rotated[:, q_heads:], qkv[:, (q_heads + kv_heads) * d:].view(batch, -1, d)

    def _attention(self, layer: int, x: torch.Tensor, positions: torch.Tensor, slots, rope) -> torch.Tensor:
        m, w, p, cache = self.model, self.w, f"layers.{layer}.", self.cache
        h = rms_norm(x, w[p + "attn_norm"], m.rms_eps)
        with self.timers.phase("attention"):
            q, k, v = self._qkv(layer, h, positions, rope)
            cache.write(layer, slots, k, v)
        dim_v = m.cache_head_dims[1]
        # T tokens per sequence (speculative decoding): q [B, T, H, Dk], each token seeing the
        # shard's keys up to its own position (query_key_lens); the exchange moves B * T rows.
        lens = slots.query_key_lens
        count = 1 if lens is None else lens.shape[1]
        if lens is not None:
            q = q.view(-1, count, *q.shape[1:])
        # HOP-B chunks of the batch (host ints: the first ones one row larger, empty ones dropped).
        sizes = [s for s in even_split(q.shape[0], self.config.hopb_chunks) if s]
        handles, merged = [], []
        self.exchange.begin_layer()
        for b0, size in zip(split_offsets(sizes), sizes):
            b1 = b0 + size
            with self.timers.phase("attention"):
                out, lse = flash_decode(q[b0:b1].contiguous(), cache.keys[layer],
                                        None if m.mla else cache.values[layer], cache.block_table[b0:b1],
                                        cache.seq_lens[b0:b1], m.softmax_scale, dim_v if m.mla else -1,
                                        query_key_lens=None if lens is None else lens[b0:b1])
                if lens is not None:
                    out, lse = out.flatten(0, 1), lse.flatten(0, 1)
            with self.timers.phase("exchange"):
                handles.append(self.exchange.start(out, lse))  # overlaps the next chunk's attention
        with self.timers.phase("exchange"):
            for handle in handles:
                merged.append(self.exchange.finish(handle)[0])
        heads_out = merged[0] if len(merged) == 1 else torch.cat(merged)  # [B, merged heads, Dv]
        with self.timers.phase("output"):
            if m.mla:
                heads_out = torch.einsum("bnc,nvc->bnv", heads_out, w[p + "w_uv"])
            y = F.linear(heads_out.flatten(1), w[p + "wo"])
            y = self._all_reduce(y)
        return y

    def _all_reduce(self, y: torch.Tensor) -> torch.Tensor:
        """The sum of y over every rank (the output projection's and the FFN's partial sums)."""
        if self.peer_all_reduce is not None:
            return self.peer_all_reduce(y)
        dist.all_reduce(y, group=self.groups.world)
        return y

    # ------------------------------------------------------------------ FFN
    def _ffn(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        m, w, p = self.model, self.w, f"layers.{layer}."
        h = rms_norm(x, w[p + "ffn_norm"], m.rms_eps)
        with self.timers.phase("ffn"):
            if m.is_moe_layer(layer):
                ids, weights = route(h, w[p + "router"], m.top_k)
                gate_up, down = w[p + "experts"]
                expert_input = h if m.expert_format == "dense" else h.to(torch.bfloat16)  # FP4 GEMM: bf16 x
                y = moe_ffn(expert_input, ids, weights, gate_up, down, w[p + "experts.first"]).to(h.dtype)
                y = y + swiglu(h, w[p + "shared.gate"], w[p + "shared.up"], w[p + "shared.down"])
            else:
                y = w[p + "ffn"](h)
            y = self._all_reduce(y)
        return y

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """Decode one token per sequence (tokens [B] on the rank's device, at positions[b]):
        logits [B, vocab] fp32. Or T tokens per sequence (tokens [B, T], T <= max_step_tokens,
        at positions[b] + [0, T): speculative decoding's last accepted token and its drafts):
        logits [B, T, vocab], each token attending causally to the ones before it; then
        rollback() drops the rejected ones."""
        count = 1 if tokens.dim() == 1 else tokens.shape[1]
        if not 1 <= count <= self.max_step_tokens:
            raise ValueError(f"HelixDecoder: a step takes 1 to max_step_tokens = {self.max_step_tokens} tokens per "
                             f"sequence, got {count}")
        if self.config.cuda_graphs and self._graph_step_tokens not in (None, tokens.shape):
            raise ValueError(f"HelixDecoder: with cuda_graphs every step has the captured shape "
                             f"{tuple(self._graph_step_tokens)}, got {tuple(tokens.shape)}")
        self._graph_step_tokens = tokens.shape
        self.cache.advance(positions, count)  # host bookkeeping (ints) and checks, before any device work
        if not self.config.cuda_graphs:
            logits = self._device_step(tokens)
        elif self._graph_stream is None:
            logits = self._warm_up(tokens)
        else:
            logits = self._graph_step(tokens)
        if self.peer_all_reduce is not None:
            self.peer_all_reduce.end_step()
        self.exchange.end_step()  # the step's only look at the device-side error flags (exchange, all-reduce)
        return logits

    def rollback(self, kept: list[int]) -> None:
        """After a step of T tokens per sequence: keep the first kept[b] of sequence b's (the
        last accepted token and its accepted drafts) and drop the rejected drafts' KV on their
        owners, so the cache is what plain decoding of the kept tokens leaves."""
        self.cache.rollback(kept)

    def _device_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """The step's device work: no host value, no host sync, fixed shapes (what a graph captures)."""
        m, w = self.model, self.w
        count = 1 if tokens.dim() == 1 else tokens.shape[1]
        slots = self.cache.step_slots(count)
        x = w["embed"][tokens.to(self.device).flatten()]  # tokens already on the device: no copy; [B * T, hidden]
        rope = None if m.mla else rope_cos_sin(slots.positions, self.rope_inverse)  # once per step, not per layer
        for layer in range(m.num_layers):
            x = x + self._attention(layer, x, slots.positions, slots, rope)
            x = x + self._ffn(layer, x)
        logits = self._lm_head(rms_norm(x, w["final_norm"], m.rms_eps))
        return logits if tokens.dim() == 1 else logits.view(*tokens.shape, -1)

    def _lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """logits [B, vocab] fp32 from the rank's vocabulary shard of the LM head: every rank
        multiplies its V / N rows (not the whole head), then one all-gather."""
        shard = F.linear(h, self.w["lm_head"]).float()  # [B, V']
        batch, width, ranks = shard.shape[0], shard.shape[1], self.config.world_size
        gathered = torch.empty(ranks * batch, width, dtype=shard.dtype, device=shard.device)  # gloo: [N * B, V']
        dist.all_gather_into_tensor(gathered, shard, group=self.groups.world)
        return gathered.view(ranks, batch, width).permute(1, 0, 2).reshape(batch, -1)[:, :self.model.vocab_size]

    def _warm_up(self, tokens: torch.Tensor) -> torch.Tensor:
        """With cuda_graphs, the first step: eager, on the stream the graph will be captured on,
        so what is made lazily (NCCL communicators, cuBLAS handles and workspaces) is made
        there before the capture, not inside it."""
        layer = runtime()
        stream, current = layer.new_stream(self.device), layer.current_stream(self.device)
        stream.wait_stream(current)
        with layer.use_stream(stream):
            logits = self._device_step(tokens)
        current.wait_stream(stream)
        layer.record_stream(logits, current)
        self._graph_stream = stream
        return logits

    def _graph_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """The step as a CUDA graph: captured at the first call, replayed at every call. Captured
        collectives are outside NCCL's watchdog, so the host bounds its wait itself: each step
        first waits (polling, at most exchange_timeout_s) for the replay two steps back (at most
        two are in flight), and fails instead of hanging on a stalled peer."""
        layer = runtime()
        sent = self.exchange.bytes_sent  # host counters: the graph does not run Python
        if self._graph is None:
            self._tokens = torch.empty_like(tokens, device=self.device)
            self._graph, self._logits = layer.capture(lambda: self._device_step(self._tokens), self._graph_stream)
            self._bytes_per_step = self.exchange.bytes_sent - sent
        if len(self._replays) == 2 and not layer.wait_event(self._replays.pop(0), self.config.exchange_timeout_s):
            raise RuntimeError(f"HelixDecoder: a replayed decode step did not finish within "
                               f"{self.config.exchange_timeout_s} s (a peer stalled in a collective: captured "
                               "collectives are outside NCCL's watchdog)")
        self._tokens.copy_(tokens)
        with self.timers.phase("graph"):
            self._graph.replay()
        done = layer.new_event()
        done.record()
        self._replays.append(done)
        self.exchange.bytes_sent = sent + self._bytes_per_step
        return self._logits.clone()  # the static output is rewritten by the next replay
