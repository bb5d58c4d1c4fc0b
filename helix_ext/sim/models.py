"""Model specifications: the shapes of one decoder layer that decide its bytes, FLOPs and traffic.

DeepSeek-R1 and Llama-3.1-405B are built in (the paper's two studies); any other model comes
from a Hugging Face ``config.json`` (``from_hf_config``). Parameter counts are per layer and
exclude norms (a few KB), the embedding and the LM head: the paper's per-layer formulas
(Appendix A) leave them out, and for the models here they are under 0.1% of a decode step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSpec:
    """The decoder-layer shapes the simulator needs.

    attention "gqa": ``num_kv_heads`` KV heads of ``head_dim``; each query head attends with
      K and V of ``head_dim``. attention "mla" (DeepSeek): one latent KV "head" per token of
      ``kv_lora_rank + qk_rope_head_dim`` elements (keys and values share it); decode runs the
      absorbed form, so the attention kernel sees queries of that width and produces outputs
      of ``kv_lora_rank`` (the latent), which W_UV lifts to ``v_head_dim`` after the merge.
    FFN: layers ``< num_dense_layers`` are dense SwiGLU of ``ffn_dim``; the rest are MoE with
      ``num_experts`` routed experts (``top_k`` per token) and ``num_shared_experts`` shared ones,
      each a SwiGLU of ``moe_ffn_dim``. A dense model has ``num_experts == 0``.
    """

    name: str
    num_layers: int
    hidden_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    attention: str = "gqa"
    # MLA
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # MoE
    num_experts: int = 0
    num_shared_experts: int = 0
    top_k: int = 0
    moe_ffn_dim: int = 0
    num_dense_layers: int | None = None

    def __post_init__(self):
        if self.attention not in ("gqa", "mla"):
            raise ValueError(f"attention: expected 'gqa' or 'mla', got {self.attention!r}")
        if self.num_dense_layers is None:
            object.__setattr__(self, "num_dense_layers", self.num_layers if self.num_experts == 0 else 0)
        for name in ("num_layers", "hidden_size", "num_q_heads", "num_kv_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.attention == "mla":
            if self.kv_lora_rank < 1 or self.num_kv_heads != 1:
                raise ValueError("MLA needs kv_lora_rank >= 1 and num_kv_heads == 1 (one latent KV head)")
        elif self.head_dim < 1 or self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"GQA needs head_dim >= 1 and num_q_heads ({self.num_q_heads}) a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.num_experts and (self.top_k < 1 or self.top_k > self.num_experts or self.moe_ffn_dim < 1):
            raise ValueError("MoE needs 1 <= top_k <= num_experts and moe_ffn_dim >= 1")
        if not 0 <= self.num_dense_layers <= self.num_layers:
            raise ValueError(f"num_dense_layers: expected 0..{self.num_layers}, got {self.num_dense_layers}")

    # ---------------------------------------------------------------- layer counts
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers if self.is_moe else 0

    # ---------------------------------------------------------------- KV cache and attention
    @property
    def kv_elements_per_head(self) -> int:
        """Cached elements per token, layer and KV head: K and V (GQA), or the latent entry (MLA)."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.head_dim

    @property
    def attention_out_dim(self) -> int:
        """Width of one query head's attention-kernel output (MLA: the latent, before W_UV)."""
        return self.kv_lora_rank if self.attention == "mla" else self.head_dim

    @property
    def value_dim(self) -> int:
        """Width of one query head's output after W_UV (MLA) or as it is (GQA)."""
        return self.v_head_dim if self.attention == "mla" else self.head_dim

    @property
    def attention_flops_per_head_token(self) -> int:
        """FLOPs per (query head, context token): q.k over the key width plus p.v over the value width."""
        if self.attention == "mla":
            return 2 * (self.kv_lora_rank + self.qk_rope_head_dim) + 2 * self.kv_lora_rank
        return 2 * self.head_dim + 2 * self.head_dim

    # ---------------------------------------------------------------- attention weights
    @property
    def attn_replicated_params(self) -> int:
        """Attention weights every attention rank holds whatever its head split (MLA's down-projections)."""
        if self.attention == "mla":
            return self.hidden_size * (self.q_lora_rank + self.kv_lora_rank + self.qk_rope_head_dim)
        return 0

    @property
    def attn_q_head_params(self) -> int:
        """Weights before the attention kernel that split with the query heads (Q; MLA's q
        up-projection and the absorbed W_UK)."""
        h = self.hidden_size
        if self.attention == "mla":
            q_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
            q_in = self.q_lora_rank or h
            return self.num_q_heads * (q_in * q_dim + self.kv_lora_rank * self.qk_nope_head_dim)
        return h * self.num_q_heads * self.head_dim

    @property
    def attn_uv_params(self) -> int:
        """MLA's W_UV, which lifts each head's latent output to v_head_dim (0 for GQA)."""
        return self.num_q_heads * self.kv_lora_rank * self.v_head_dim if self.attention == "mla" else 0

    @property
    def attn_kv_head_params_per_head(self) -> int:
        """K and V projection weights of one KV head (0 for MLA: its KV projection is replicated)."""
        return 0 if self.attention == "mla" else 2 * self.hidden_size * self.head_dim

    @property
    def o_proj_params(self) -> int:
        v = self.v_head_dim if self.attention == "mla" else self.head_dim
        return self.num_q_heads * v * self.hidden_size

    @property
    def attention_params(self) -> int:
        return (self.attn_replicated_params + self.attn_q_head_params + self.attn_uv_params
                + self.num_kv_heads * self.attn_kv_head_params_per_head + self.o_proj_params)

    # ---------------------------------------------------------------- FFN weights
    @property
    def dense_ffn_params(self) -> int:
        return 3 * self.hidden_size * self.ffn_dim

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.moe_ffn_dim

    @property
    def router_params(self) -> int:
        return self.hidden_size * self.num_experts

    @property
    def moe_layer_ffn_params(self) -> int:
        return ((self.num_experts + self.num_shared_experts) * self.expert_params + self.router_params)

    @property
    def total_params(self) -> int:
        """Decoder-layer parameters (no embedding, LM head or norms)."""
        return (self.num_layers * self.attention_params + self.num_dense_layers * self.dense_ffn_params
                + self.num_moe_layers * self.moe_layer_ffn_params)


DEEPSEEK_R1 = ModelSpec(
    # deepseek-ai/DeepSeek-R1 config.json (the DeepSeek-V3 architecture).
    name="DeepSeek-R1", num_layers=61, hidden_size=7168, num_q_heads=128, num_kv_heads=1, head_dim=0,
    ffn_dim=18432, attention="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, num_experts=256, num_shared_experts=1, top_k=8, moe_ffn_dim=2048,
    num_dense_layers=3,
)

LLAMA_405B = ModelSpec(
    # meta-llama/Llama-3.1-405B config.json.
    name="Llama-3.1-405B", num_layers=126, hidden_size=16384, num_q_heads=128, num_kv_heads=8, head_dim=128,
    ffn_dim=53248,
)

MODELS = {"deepseek-r1": DEEPSEEK_R1, "llama-405b": LLAMA_405B}


def from_hf_config(config: dict | str | Path, name: str | None = None) -> ModelSpec:
    """A ModelSpec from a Hugging Face ``config.json`` (a path or the parsed dict).

    Reads the standard fields: ``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``,
    ``num_key_value_heads`` (default: MHA), ``head_dim`` (default hidden / heads),
    ``intermediate_size``; MLA when ``kv_lora_rank`` is set (``q_lora_rank``,
    ``qk_nope_head_dim``, ``qk_rope_head_dim``, ``v_head_dim``); MoE from ``n_routed_experts``,
    ``num_local_experts`` or ``num_experts`` with ``num_experts_per_tok``,
    ``moe_intermediate_size`` (default ``intermediate_size``), ``n_shared_experts`` or
    ``shared_expert_intermediate_size``, and ``first_k_dense_replace``. A multimodal config's
    ``text_config`` is used when present.
    """
    if not isinstance(config, dict):
        path = Path(config)
        config = json.loads(path.read_text())
        name = name or path.parent.name or path.stem
    config = config.get("text_config") or config

    def need(key: str):
        if config.get(key) is None:
            raise ValueError(f"config.json: missing required field {key!r}")
        return config[key]

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    fields = dict(
        name=name or config.get("_name_or_path") or config.get("model_type") or "hf-model",
        num_layers=int(need("num_hidden_layers")), hidden_size=hidden, num_q_heads=heads,
        ffn_dim=int(config.get("intermediate_size") or 0),
    )
    if config.get("kv_lora_rank"):
        fields.update(attention="mla", num_kv_heads=1, head_dim=0, q_lora_rank=int(config.get("q_lora_rank") or 0),
                      kv_lora_rank=int(config["kv_lora_rank"]), qk_nope_head_dim=int(need("qk_nope_head_dim")),
                      qk_rope_head_dim=int(need("qk_rope_head_dim")), v_head_dim=int(need("v_head_dim")))
    else:
        fields.update(num_kv_heads=int(config.get("num_key_value_heads") or heads),
                      head_dim=int(config.get("head_dim") or hidden // heads))
    experts = config.get("n_routed_experts") or config.get("num_local_experts") or config.get("num_experts")
    if experts:
        moe_dim = int(config.get("moe_intermediate_size") or fields["ffn_dim"])
        shared = config.get("n_shared_experts")
        if shared is None and config.get("shared_expert_intermediate_size"):
            shared = math.ceil(config["shared_expert_intermediate_size"] / moe_dim)  # Qwen-MoE style
        dense_layers = int(config.get("first_k_dense_replace") or 0)
        fields.update(num_experts=int(experts), top_k=int(need("num_experts_per_tok")), moe_ffn_dim=moe_dim,
                      num_shared_experts=int(shared or 0), num_dense_layers=dense_layers)
        if dense_layers and not fields["ffn_dim"]:
            raise ValueError("config.json: first_k_dense_replace > 0 needs intermediate_size")
    elif not fields["ffn_dim"]:
        raise ValueError("config.json: missing required field 'intermediate_size'")
    return ModelSpec(**fields)


def get_model(name_or_path: str) -> ModelSpec:
    """A built-in model by name (``deepseek-r1``, ``llama-405b``) or a path to a ``config.json``."""
    key = name_or_path.lower()
    if key in MODELS:
        return MODELS[key]
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return from_hf_config(path)
    raise ValueError(f"model: expected one of {sorted(MODELS)} or a path to a config.json, got {name_or_path!r}")
