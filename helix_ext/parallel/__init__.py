"""The Helix runtime on torch.distributed: rank layout and process groups, the round-robin
KV cache, attention with the KV-parallel exchange, TP/EP FFN, HOP-B, and the demo."""

from helix_ext.parallel.config import HelixConfig, HelixConfigError, RankLayout
from helix_ext.parallel.decoder import HelixDecoder, HelixGroups
from helix_ext.parallel.kv_cache import HelixKVCache
from helix_ext.parallel.models import ModelConfig, ReferenceDecoder, tiny_deepseek, tiny_llama

__all__ = ["HelixConfig", "HelixConfigError", "HelixDecoder", "HelixGroups", "HelixKVCache", "ModelConfig",
           "RankLayout", "ReferenceDecoder", "tiny_deepseek", "tiny_llama"]
