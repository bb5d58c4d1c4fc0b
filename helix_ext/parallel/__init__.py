"""The Helix runtime on torch.distributed: rank layout and process groups, the round-robin
KV cache, attention with the KV-parallel exchange, TP/EP FFN (dense in fp32, bf16 or FP4), HOP-B,
the seeded tiny models, SmolLM2-135M through transformers (hf_model; imported on demand, it needs
transformers) and the demos."""

from helix_ext.parallel.config import HelixConfig, HelixConfigError, RankLayout
from helix_ext.parallel.decoder import HelixDecoder, HelixGroups
from helix_ext.parallel.ffn import DenseFfn, QuantizedFfn
from helix_ext.parallel.kv_cache import HelixKVCache
from helix_ext.parallel.models import ModelConfig, ReferenceDecoder, tiny_deepseek, tiny_llama

__all__ = ["DenseFfn", "HelixConfig", "HelixConfigError", "HelixDecoder", "HelixGroups", "HelixKVCache", "ModelConfig",
           "QuantizedFfn", "RankLayout", "ReferenceDecoder", "tiny_deepseek", "tiny_llama"]
