"""Small seeded models for the runtime's demo and tests, and a plain single-rank decoder.

Two families: a Llama-like decoder (GQA attention, dense SwiGLU FFN) and a DeepSeek-like one
(MLA attention in its absorbed decode form, MoE FFN with a shared expert and top-k routing,
the first layers dense). Weights are drawn from a seed, identically on every rank; the
ReferenceDecoder runs them on one rank with the references of helix_ext.reference, and is
what the Helix runtime must reproduce.

A long context's KV cache is synthesized (seeded random entries, block by block) rather than
computed by a prefill: on a CPU machine a 32K-token prefill would dominate the demo. Each
(layer, sequence, block) has its own seed, so a rank can make just the blocks it holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from helix_ext.reference import flash_decode_reference


@dataclass(frozen=True)
class ModelConfig:
    family: str = "llama"          # "llama" (GQA + dense) or "deepseek" (MLA + MoE)
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 2
    num_q_heads: int = 8
    num_kv_heads: int = 4          # llama; MLA has one latent "KV head"
    head_dim: int = 64             # llama (64: a head dim the CUDA flash_decode takes)
    ffn_dim: int = 256             # dense FFN (llama layers, deepseek's first dense layers)
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    # MLA (absorbed): cached entry = [kv_lora_rank latent | qk_rope_head_dim rotary key]; 512 + 64
    # as in DeepSeek-V3/R1, the (576, 512) shape of the CUDA flash_decode's MLA kernel
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 64
    v_head_dim: int = 32
    # MoE
    num_experts: int = 0
    top_k: int = 2
    moe_ffn_dim: int = 64
    num_shared_experts: int = 1
    first_dense_layers: int = 1
    expert_format: str = "dense"   # "dense" (plain weights in the model dtype) or "nvfp4" / "mxfp4"
    ffn_format: str = "none"       # dense FFN layers: "none", "bf16", "nvfp4", "mxfp4" (helix_ext.parallel.ffn)
    name: str = ""                 # a real model's name ("" for the seeded tiny ones)
    dtype: torch.dtype = torch.float32
    seed: int = 0

    @property
    def mla(self) -> bool:
        return self.family == "deepseek"

    @property
    def attention_kv_heads(self) -> int:
        return 1 if self.mla else self.num_kv_heads

    @property
    def cache_head_dims(self) -> tuple[int, int]:
        """(Dk, Dv) of the cache and of flash_decode."""
        if self.mla:
            return self.kv_lora_rank + self.qk_rope_head_dim, self.kv_lora_rank
        return self.head_dim, self.head_dim

    @property
    def softmax_scale(self) -> float:
        return (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5 if self.mla else self.head_dim ** -0.5

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer >= self.first_dense_layers


def tiny_llama(**overrides) -> ModelConfig:
    return replace(ModelConfig(family="llama"), **overrides)


def tiny_deepseek(**overrides) -> ModelConfig:
    base = ModelConfig(family="deepseek", num_q_heads=8, num_experts=8, top_k=2, moe_ffn_dim=64, num_layers=3,
                       first_dense_layers=1)
    return replace(base, **overrides)


def _normal(generator: torch.Generator, *shape: int, fan_in: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) / math.sqrt(fan_in)


def make_weights(config: ModelConfig) -> dict[str, torch.Tensor]:
    """All weights of the model in float32 (callers cast), drawn from config.seed."""
    g = torch.Generator().manual_seed(config.seed)
    h = config.hidden_size
    w = {
        "embed": torch.randn(config.vocab_size, h, generator=g),
        "final_norm": 1.0 + 0.1 * torch.randn(h, generator=g),
        "lm_head": _normal(g, config.vocab_size, h, fan_in=h),
    }
    for layer in range(config.num_layers):
        p = f"layers.{layer}."
        w[p + "attn_norm"] = 1.0 + 0.1 * torch.randn(h, generator=g)
        w[p + "ffn_norm"] = 1.0 + 0.1 * torch.randn(h, generator=g)
        if config.mla:
            qk = config.qk_nope_head_dim + config.qk_rope_head_dim
            w[p + "wq"] = _normal(g, config.num_q_heads * qk, h, fan_in=h)
            w[p + "w_dkv"] = _normal(g, config.kv_lora_rank, h, fan_in=h)
            w[p + "w_kr"] = _normal(g, config.qk_rope_head_dim, h, fan_in=h)
            w[p + "kv_norm"] = 1.0 + 0.1 * torch.randn(config.kv_lora_rank, generator=g)
            w[p + "w_uk"] = _normal(g, config.num_q_heads, config.qk_nope_head_dim, config.kv_lora_rank,
                                    fan_in=config.kv_lora_rank)
            w[p + "w_uv"] = _normal(g, config.num_q_heads, config.v_head_dim, config.kv_lora_rank,
                                    fan_in=config.kv_lora_rank)
            w[p + "wo"] = _normal(g, h, config.num_q_heads * config.v_head_dim, fan_in=config.num_q_heads * config.v_head_dim)
        else:
            d = config.head_dim
            w[p + "wq"] = _normal(g, config.num_q_heads * d, h, fan_in=h)
            w[p + "wk"] = _normal(g, config.num_kv_heads * d, h, fan_in=h)
            w[p + "wv"] = _normal(g, config.num_kv_heads * d, h, fan_in=h)
            w[p + "wo"] = _normal(g, h, config.num_q_heads * d, fan_in=config.num_q_heads * d)
        if config.is_moe_layer(layer):
            e, f = config.num_experts, config.moe_ffn_dim
            w[p + "router"] = _normal(g, e, h, fan_in=h)
            w[p + "experts.gate_up"] = _normal(g, e, 2 * f, h, fan_in=h)
            w[p + "experts.down"] = _normal(g, e, h, f, fan_in=f)
            shared = f * config.num_shared_experts
            w[p + "shared.gate"] = _normal(g, shared, h, fan_in=h)
            w[p + "shared.up"] = _normal(g, shared, h, fan_in=h)
            w[p + "shared.down"] = _normal(g, h, shared, fan_in=shared)
        else:
            f = config.ffn_dim
            w[p + "ffn.gate"] = _normal(g, f, h, fan_in=h)
            w[p + "ffn.up"] = _normal(g, f, h, fan_in=h)
            w[p + "ffn.down"] = _normal(g, h, f, fan_in=f)
    return w


def context_block(config: ModelConfig, layer: int, sequence: int, block: int, tokens: int,
                  block_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Synthesized cache entries of one block of a long context: (k [n, Hkv, Dk], v [n, Hkv, Dv]
    or None for MLA), n = min(block_size, tokens - block * block_size), from a per-block seed."""
    count = min(block_size, tokens - block * block_size)
    g = torch.Generator().manual_seed(hash((config.seed, layer, sequence, block)) % (2 ** 62))
    dim_k, dim_v = config.cache_head_dims
    keys = torch.randn(count, config.attention_kv_heads, dim_k, generator=g)
    values = None if config.mla else torch.randn(count, config.attention_kv_heads, dim_v, generator=g)
    return keys, values


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight`` computed in float32, rounded to x's dtype (Llama's
    RMSNorm). One ATen call (``F.rms_norm``, the same bits on the CPU as the composite below,
    which handles a weight of another dtype): a decode step makes 2 per layer per rank."""
    if weight.dtype == x.dtype:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def rope_inverse_frequencies(d: int, theta: float) -> torch.Tensor:
    """``1 / theta ** (2i / d)`` in float32 on the CPU, as transformers computes them."""
    return 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).to(torch.float32) / d))


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float,
               inverse: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary embedding (rotate-half) of x [B, heads, d] at positions [B].

    The arithmetic is Hugging Face transformers' Llama rotary embedding, step for step in
    float32 (inverse frequencies ``1 / theta ** (2i / d)``, angles ``position * inv_freq``,
    cos/sin of those), so a real model decodes with the very bits transformers uses: at
    position 4000 a float64 angle already differs from the float32 one by ~1e-4 rad.
    ``inverse``: the inverse frequencies already on x's device (rope_inverse_frequencies,
    copied once), so a decode step builds nothing on the host."""
    if inverse is None:
        inverse = rope_inverse_frequencies(x.shape[-1], theta)
    return rotate(x, *rope_cos_sin(positions, inverse.to(x.device)))


def rope_cos_sin(positions: torch.Tensor, inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables apply_rope rotates by, [B, 1, d] float32 on inverse's device: cos of the
    angles position * inv_freq, and their sin with the first half negated (rotate-half's sign,
    so rotate() is one roll and three arithmetic ops). Computed once per decode step and
    shared by every layer."""
    angles = positions.to(device=inverse.device, dtype=torch.float32).unsqueeze(-1) * inverse  # [B, d/2]
    sin = angles.sin()
    return torch.cat([angles, angles], dim=-1).cos().unsqueeze(1), torch.cat([-sin, sin], dim=-1).unsqueeze(1)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, d] rotated (rotate-half) by rope_cos_sin's tables, in float32:
    ``x * cos + [-x2, x1] * sin`` written as ``x * cos + [x2, x1] * [-sin1, sin2]``, the same
    products (a sign moved between factors is exact), so the same bits as transformers'."""
    x32 = x if x.dtype == torch.float32 else x.float()
    out = x32 * cos + x32.roll(x.shape[-1] // 2, dims=-1) * signed_sin
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def mla_query_and_entry(config: ModelConfig, w: dict, p: str, h: torch.Tensor, positions: torch.Tensor,
                        heads: range, rope_inverse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA for query heads `heads`: the flash_decode query [B, heads, Dk] and this
    token's cache entry [B, 1, Dk] = [normalized latent | rotary key]."""
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    wq = w[p + "wq"].view(config.num_q_heads, qk, -1)[heads.start:heads.stop]
    q = torch.einsum("bh,nqh->bnq", h, wq)
    q_nope, q_rope = q[..., :config.qk_nope_head_dim], q[..., config.qk_nope_head_dim:]
    q_rope = apply_rope(q_rope, positions, config.rope_theta, rope_inverse)
    q_latent = torch.einsum("bnd,ndc->bnc", q_nope, w[p + "w_uk"][heads.start:heads.stop])
    latent = rms_norm(h @ w[p + "w_dkv"].T, w[p + "kv_norm"], config.rms_eps)
    rope_key = apply_rope((h @ w[p + "w_kr"].T).unsqueeze(1), positions, config.rope_theta, rope_inverse)
    return torch.cat([q_latent, q_rope], dim=-1), torch.cat([latent.unsqueeze(1), rope_key], dim=-1)


class ReferenceDecoder:
    """The model on one rank, written plainly: full weights, one unpaged cache per sequence,
    attention by helix_ext.reference.flash_decode_reference (float64), the FFN and MoE as
    plain matmuls over every expert. Decoding appends each token's KV, then attends."""

    def __init__(self, config: ModelConfig, context_lengths: list[int], block_size: int):
        self.config = config
        self.w = {k: v.to(config.dtype) for k, v in make_weights(config).items()}
        self.keys: list[list[torch.Tensor]] = []
        self.values: list[list[torch.Tensor | None]] = []
        for layer in range(config.num_layers):
            layer_keys, layer_values = [], []
            for b, tokens in enumerate(context_lengths):
                blocks = [context_block(config, layer, b, i, tokens, block_size)
                          for i in range(math.ceil(tokens / block_size))]
                dim_k, dim_v = config.cache_head_dims
                empty_k = torch.empty(0, config.attention_kv_heads, dim_k)
                layer_keys.append(torch.cat([k for k, _ in blocks] or [empty_k]).to(config.dtype))
                if config.mla:
                    layer_values.append(None)
                else:
                    empty_v = torch.empty(0, config.attention_kv_heads, dim_v)
                    layer_values.append(torch.cat([v for _, v in blocks] or [empty_v]).to(config.dtype))
            self.keys.append(layer_keys)
            self.values.append(layer_values)

    def _attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """flash_decode_reference over each sequence's whole cache (laid out as one block)."""
        c = self.config
        outs = []
        for b in range(q.shape[0]):
            keys = self.keys[layer][b].unsqueeze(0)
            values = None if c.mla else self.values[layer][b].unsqueeze(0)
            table = torch.zeros(1, 1, dtype=torch.int32)
            lengths = torch.tensor([keys.shape[1]], dtype=torch.int32)
            out, _ = flash_decode_reference(q[b:b + 1], keys, values, table, lengths, c.softmax_scale,
                                            c.cache_head_dims[1] if c.mla else -1)
            outs.append(out)
        return torch.cat(outs)

    def _ffn(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        c, w, p = self.config, self.w, f"layers.{layer}."
        if not c.is_moe_layer(layer):
            from helix_ext.parallel.ffn import DenseFfn
            return DenseFfn.from_full(c.ffn_format, w[p + "ffn.gate"], w[p + "ffn.up"], w[p + "ffn.down"], None,
                                      x.device)(x)
        from helix_ext.parallel.experts import reference_expert_weights, route
        gate_up, down = reference_expert_weights(c, w, p)
        ids, weights = route(x, w[p + "router"], c.top_k)
        out = swiglu(x, w[p + "shared.gate"], w[p + "shared.up"], w[p + "shared.down"]).float()
        f = c.moe_ffn_dim
        for t in range(x.shape[0]):
            for j in range(c.top_k):
                e = int(ids[t, j])
                expert = swiglu(x[t:t + 1], gate_up[e, :f], gate_up[e, f:], down[e]).float()
                out[t] += weights[t, j] * expert[0]
        return out.to(x.dtype)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step of every sequence: logits [B, vocab] (float32)."""
        c, w = self.config, self.w
        x = w["embed"][tokens]
        for layer in range(c.num_layers):
            p = f"layers.{layer}."
            h = rms_norm(x, w[p + "attn_norm"], c.rms_eps)
            if c.mla:
                q, entry = mla_query_and_entry(c, w, p, h, positions, range(c.num_q_heads))
                for b in range(x.shape[0]):
                    self.keys[layer][b] = torch.cat([self.keys[layer][b], entry[b:b + 1]])
                latent_out = self._attend(layer, q)  # [B, Hq, kv_lora_rank]
                heads_out = torch.einsum("bnc,nvc->bnv", latent_out, w[p + "w_uv"])
            else:
                d = c.head_dim
                q = apply_rope((h @ w[p + "wq"].T).view(-1, c.num_q_heads, d), positions, c.rope_theta)
                k = apply_rope((h @ w[p + "wk"].T).view(-1, c.num_kv_heads, d), positions, c.rope_theta)
                v = (h @ w[p + "wv"].T).view(-1, c.num_kv_heads, d)
                for b in range(x.shape[0]):
                    self.keys[layer][b] = torch.cat([self.keys[layer][b], k[b:b + 1]])
                    self.values[layer][b] = torch.cat([self.values[layer][b], v[b:b + 1]])
                heads_out = self._attend(layer, q)
            x = x + heads_out.flatten(1) @ w[p + "wo"].T
            x = x + self._ffn(layer, rms_norm(x, w[p + "ffn_norm"], c.rms_eps))
        return (rms_norm(x, w["final_norm"], c.rms_eps) @ w["lm_head"].T).float()
