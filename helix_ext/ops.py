"""Typed Python wrappers of ``torch.ops.helix.*``, and their fake (meta) kernels.

Each wrapper documents its op's contract (see shared DESIGN.md section 3); the fake
kernels let ``torch.compile`` and ``torch.library.opcheck`` trace the ops without running
them, and check the same shapes and dtypes as the native kernels.
"""

from __future__ import annotations

import math
import struct

import torch

from helix_ext._build_info import CUDA_BUILT, CUDA_SKIP_REASON

_MERGE_STATES_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (Dk, Dv) pairs the CUDA flash_decode kernel is compiled for (csrc/cuda/flash_decode_variants.h);
# the CPU kernel takes any head dims.
CUDA_FLASH_DECODE_HEAD_DIMS = ((64, 64), (128, 128), (256, 256), (576, 512))
_FLASH_DECODE_Q_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _require_device_kernel(op: str, tensor: torch.Tensor) -> None:
    # Fail loudly, naming the cause, instead of the dispatcher's generic "no kernel" error.
    if tensor.is_cuda and not CUDA_BUILT:
        raise RuntimeError(
            f"helix.{op}: helix_ext was built without CUDA kernels ({CUDA_SKIP_REASON}); "
            "rebuild with a CUDA build of torch and a CUDA toolkit")


def merge_states(parts_out: torch.Tensor, parts_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge P partial attention states exactly (the log-sum-exp merge of Helix's exchange).

    For every (b, h): ``lse = log(sum_p exp(parts_lse[p, b, h]))`` and
    ``out = sum_p exp(parts_lse[p, b, h] - lse) * parts_out[p, b, h]``, computed in fp32 with
    the weights taken relative to the largest LSE and divided by their sum, so the accuracy
    does not depend on |LSE| (1 or 2e4 alike). A part whose LSE is ``-inf`` is absent (a KV
    shard with no tokens): it contributes nothing and its ``parts_out`` values are never
    read, so they may be garbage. A row with every part absent gives ``out = 0`` and
    ``lse = -inf``, never NaN. A ``+inf`` or NaN LSE among a row's parts makes that row's
    out and lse NaN (``-inf`` means absent and nothing else).

    Args:
        parts_out: ``[P, B, H, D]`` float32, bfloat16 or float16; any strides (the fast CUDA
            path wants D contiguous and 16-byte aligned vectors).
        parts_lse: ``[P, B, H]`` float32, natural-log LSE of each part; any strides.

    Returns:
        ``(out, lse)``: ``out`` ``[B, H, D]`` in ``parts_out``'s dtype and ``lse`` ``[B, H]``
        float32, both contiguous, on ``parts_out``'s device.
    """
    _require_device_kernel("merge_states", parts_out)
    return torch.ops.helix.merge_states.default(parts_out, parts_lse)


@torch.library.register_fake("helix::merge_states")
def _merge_states_fake(parts_out: torch.Tensor, parts_lse: torch.Tensor):
    if parts_out.dim() != 4:
        raise RuntimeError(f"merge_states: parts_out must be 4-D [P, B, H, D], got {parts_out.dim()}-D")
    if parts_lse.dim() != 3:
        raise RuntimeError(f"merge_states: parts_lse must be 3-D [P, B, H], got {parts_lse.dim()}-D")
    if parts_out.dtype not in _MERGE_STATES_DTYPES:
        raise RuntimeError(f"merge_states: parts_out must be float32, bfloat16 or float16, got {parts_out.dtype}")
    if parts_lse.dtype != torch.float32:
        raise RuntimeError(f"merge_states: parts_lse must be float32, got {parts_lse.dtype}")
    if parts_out.device != parts_lse.device:
        raise RuntimeError("merge_states: parts_out and parts_lse must be on the same device, "
                           f"got {parts_out.device} and {parts_lse.device}")
    num_parts, batch, heads, head_dim = parts_out.shape
    torch._check(parts_lse.shape[0] == num_parts,
                 lambda: f"merge_states: parts_lse has {parts_lse.shape[0]} parts but parts_out has {num_parts}")
    torch._check(parts_lse.shape[1] == batch and parts_lse.shape[2] == heads,
                 lambda: f"merge_states: parts_lse must be [P, B, H] matching parts_out, got {tuple(parts_lse.shape)}")
    torch._check(head_dim >= 1, lambda: "merge_states: parts_out must have a head dim D >= 1")
    out = parts_out.new_empty((batch, heads, head_dim))
    lse = parts_out.new_empty((batch, heads), dtype=torch.float32)
    return out, lse


def flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, softmax_scale: float, head_dim_v: int = -1,
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                 num_splits: int = 0,
                 query_key_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over one KV shard of a paged cache, returning the partial output and its LSE.

    For each sequence b and query head h (reading KV head ``h // (Hq // Hkv)``, so MHA, GQA
    and MQA are all covered): ``s_t = softmax_scale * k_scale * (q[b, h] . K_t)`` over the
    sequence's first ``seq_lens[b]`` cached tokens, ``lse[b, h] = log(sum_t exp(s_t))``
    (natural log, fp32) and ``out[b, h] = v_scale * sum_t softmax(s)_t V_t``. A sequence of
    length 0 (an empty shard) gives ``out = 0`` and ``lse = -inf``, which ``merge_states``
    treats as absent: running this op on each KV-parallel shard and merging the results
    reproduces attention over the whole sequence exactly. A NaN or ``+inf`` score (NaN in q,
    K or k_scale, an fp8 NaN code, a score overflowing fp32 to ``+inf``) makes that row's out
    and lse NaN, whatever the number of splits, never ``0`` and ``-inf``. (A score overflowing to
    ``-inf`` weighs 0, like a masked one.)

    Several query tokens per sequence (speculative decoding: the last accepted token and its
    drafts): q ``[B, Q, Hq, Dk]`` gives out ``[B, Q, Hq, Dv]`` and lse ``[B, Q, Hq]``; query i of
    sequence b attends to the first ``query_key_lens[b, i]`` keys of the shard (by default
    ``max(0, seq_lens[b] - Q + 1 + i)``: causal over the shard's last Q keys), and a query that
    sees no key gives 0 and ``-inf``. A KV head's Q x group (query, head) rows share each read
    of a K/V tile (the CUDA kernel packs them into its MMA rows, the CPU into its GEMM rows).

    Args:
        q: ``[B, Hq, Dk]`` (one decode token per sequence) or ``[B, Q, Hq, Dk]``, bfloat16 or
            float16; float32 too on the CPU (for exact-arithmetic test models; the CUDA kernel
            uses bf16/fp16 tensor cores).
        k_cache: ``[num_blocks, block_size, Hkv, Dk]`` in q's dtype or float8_e4m3fn; any
            block size >= 1; strides allowed, the last dim contiguous.
        v_cache: ``[num_blocks, block_size, Hkv, Dv]`` with k_cache's dtype, or None for MLA's
            absorbed form (V = the first ``head_dim_v`` dims of each K entry, scaled by k_scale).
        block_table: ``[B, max_blocks]`` int32, the physical block of each logical block.
        seq_lens: ``[B]`` int32, tokens per sequence, ``0 <= seq_lens[b] <= max_blocks * block_size``.
        softmax_scale: the score scale, typically ``Dk ** -0.5``; finite as a float32 times log2(e).
        head_dim_v: Dv for MLA (-1: Dk, or v_cache's head dim when v_cache is given).
        k_scale, v_scale: float32 one-element tensors, per-tensor dequantization multipliers
            (required for float8 caches; v_scale must be None for MLA).
        num_splits: KV splits per sequence inside one GPU, at most 4096 (0 = choose from the device's SM
            count, B * Hkv and the cache capacity; the actual lengths are split evenly on the
            device). Ignored on the CPU, which chooses its own chunks.
        query_key_lens: ``[B, Q]`` int32, the keys each query token sees (its shard's first
            ones); non-decreasing in i, each in ``[0, seq_lens[b]]``.

    Returns:
        ``(out, lse)``: ``out`` ``[B, Hq, Dv]`` (``[B, Q, Hq, Dv]``) in q's dtype, ``lse``
        ``[B, Hq]`` (``[B, Q, Hq]``) float32.

    Block ids, lengths and query_key_lens are validated on CPU; on CUDA only with
    ``HELIX_CHECK_INPUTS=1`` (a device sync), otherwise invalid values give an unspecified
    result, never an out-of-bounds access.
    """
    _require_device_kernel("flash_decode", q)
    return torch.ops.helix.flash_decode.default(q, k_cache, v_cache, block_table, seq_lens, softmax_scale,
                                                head_dim_v, k_scale, v_scale, num_splits, query_key_lens)


def _check_scale(scale, name: str) -> None:
    if scale is not None and (scale.dtype != torch.float32 or scale.numel() != 1):
        raise RuntimeError(f"flash_decode: {name} must be a float32 tensor with one element (a per-tensor scale), "
                           f"got {scale.dtype} with shape {tuple(scale.shape)}")


def _to_float32(value: float) -> float:
    """value rounded to float32 (inf beyond its range)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _float32_times_log2e_is_finite(scale: float) -> bool:
    """float(scale) * float(log2 e) in float32 arithmetic is finite, as the kernels compute it
    (the double product of two floats is exact, so rounding it once is the float32 product)."""
    return math.isfinite(_to_float32(_to_float32(scale) * _to_float32(1.4426950408889634)))


@torch.library.register_fake("helix::flash_decode")
def _flash_decode_fake(q, k_cache, v_cache, block_table, seq_lens, softmax_scale, head_dim_v=-1, k_scale=None,
                       v_scale=None, num_splits=0, query_key_lens=None):
    # The same checks as csrc/flash_decode_args.h, minus the value checks (they need data).
    if q.dim() not in (3, 4):
        raise RuntimeError("flash_decode: q must be 3-D [B, Hq, Dk] or 4-D [B, Q, Hq, Dk] (Q query tokens per "
                           f"sequence), got shape {tuple(q.shape)}")
    if q.dtype not in _FLASH_DECODE_Q_DTYPES:
        raise RuntimeError(f"flash_decode: q must be bfloat16, float16 or float32 (float32: CPU only), got {q.dtype}")
    if k_cache.dim() != 4:
        raise RuntimeError("flash_decode: k_cache must be 4-D [num_blocks, block_size, Hkv, Dk], "
                           f"got shape {tuple(k_cache.shape)}")
    if k_cache.dtype not in (q.dtype, torch.float8_e4m3fn):
        raise RuntimeError(f"flash_decode: k_cache must have q's dtype ({q.dtype}) or float8_e4m3fn, "
                           f"got {k_cache.dtype}")
    batch, num_q_heads, head_dim_k = q.shape[0], q.shape[-2], q.shape[-1]
    num_queries = q.shape[1] if q.dim() == 4 else 1
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    torch._check(k_cache.shape[3] == head_dim_k,
                 lambda: f"flash_decode: k_cache's head dim ({k_cache.shape[3]}) must equal q's ({head_dim_k})")
    torch._check(num_q_heads % num_kv_heads == 0,
                 lambda: f"flash_decode: q's head count ({num_q_heads}) must be a multiple of k_cache's KV head "
                         f"count ({num_kv_heads})")
    if v_cache is not None:
        if v_cache.dim() != 4:
            raise RuntimeError("flash_decode: v_cache must be 4-D [num_blocks, block_size, Hkv, Dv], "
                               f"got shape {tuple(v_cache.shape)}")
        if v_cache.dtype != k_cache.dtype:
            raise RuntimeError(f"flash_decode: v_cache must have k_cache's dtype ({k_cache.dtype}), got {v_cache.dtype}")
        torch._check(tuple(v_cache.shape[:3]) == (num_blocks, block_size, num_kv_heads),
                     lambda: "flash_decode: v_cache must match k_cache in [num_blocks, block_size, Hkv] = "
                             f"{tuple(k_cache.shape[:3])}, got {tuple(v_cache.shape)}")
        torch._check(head_dim_v == -1 or head_dim_v == v_cache.shape[3],
                     lambda: f"flash_decode: head_dim_v ({head_dim_v}) must be -1 or v_cache's head dim "
                             f"({v_cache.shape[3]})")
        dim_v = v_cache.shape[3]
    else:
        dim_v = head_dim_k if head_dim_v == -1 else head_dim_v
        torch._check(1 <= dim_v <= head_dim_k,
                     lambda: f"flash_decode: with v_cache=None (MLA), head_dim_v must be -1 or in [1, Dk={head_dim_k}], "
                             f"got {head_dim_v}")
        if v_scale is not None:
            raise RuntimeError("flash_decode: v_scale must be None when v_cache is None "
                               "(V comes from k_cache and uses k_scale)")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise RuntimeError(f"flash_decode: block_table must be 2-D [B={batch}, max_blocks], "
                           f"got shape {tuple(block_table.shape)}")
    if block_table.dtype != torch.int32:
        raise RuntimeError(f"flash_decode: block_table must be int32, got {block_table.dtype}")
    if seq_lens.dim() != 1 or seq_lens.shape[0] != batch:
        raise RuntimeError(f"flash_decode: seq_lens must be 1-D [B={batch}], got shape {tuple(seq_lens.shape)}")
    if seq_lens.dtype != torch.int32:
        raise RuntimeError(f"flash_decode: seq_lens must be int32, got {seq_lens.dtype}")
    for tensor, name in ((q, "q"), (k_cache, "k_cache"), (v_cache, "v_cache")):
        if tensor is not None and tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
            raise RuntimeError(f"flash_decode: {name}'s last dim must be contiguous (stride 1), got strides "
                               f"{tuple(tensor.stride())}")
    if not (math.isfinite(softmax_scale) and _float32_times_log2e_is_finite(softmax_scale)):
        raise RuntimeError(f"flash_decode: softmax_scale must be finite in float32 times log2(e) (|x| <= 2.3e38), "
                           f"got {softmax_scale}")
    if num_splits < 0:
        raise RuntimeError(f"flash_decode: num_splits must be >= 0 (0 = heuristic), got {num_splits}")
    if query_key_lens is not None:
        if query_key_lens.dim() != 2 or tuple(query_key_lens.shape) != (batch, num_queries):
            raise RuntimeError(f"flash_decode: query_key_lens must be 2-D [B={batch}, Q={num_queries}], got shape "
                               f"{tuple(query_key_lens.shape)}")
        if query_key_lens.dtype != torch.int32:
            raise RuntimeError(f"flash_decode: query_key_lens must be int32, got {query_key_lens.dtype}")
        if query_key_lens.device != q.device:
            raise RuntimeError(f"flash_decode: query_key_lens must be on {q.device} (q's device), got "
                               f"{query_key_lens.device}")
    if k_cache.dtype == torch.float8_e4m3fn:
        if k_scale is None:
            raise RuntimeError("flash_decode: k_scale is required when k_cache is float8_e4m3fn")
        if v_cache is not None and v_scale is None:
            raise RuntimeError("flash_decode: v_scale is required when v_cache is float8_e4m3fn")
    _check_scale(k_scale, "k_scale")
    _check_scale(v_scale, "v_scale")
    if q.device.type == "cuda":
        _check_flash_decode_cuda(q, k_cache, v_cache, head_dim_k, dim_v, num_splits)
    rows = (batch, num_queries, num_q_heads) if q.dim() == 4 else (batch, num_q_heads)
    return q.new_empty(rows + (dim_v,)), q.new_empty(rows, dtype=torch.float32)


_FLASH_DECODE_MAX_SPLITS = 4096  # csrc/cuda/flash_decode_launch.h: kMaxSplits


def _check_flash_decode_cuda(q, k_cache, v_cache, head_dim_k, dim_v, num_splits):
    """What the CUDA launcher checks beyond the shared argument checks (csrc/cuda/flash_decode_launch.h),
    so that fake CUDA tensors (torch.compile, the runtime's GPU dry run) fail where a GPU would."""
    if q.dtype == torch.float32:
        raise RuntimeError("flash_decode: the CUDA kernel takes bfloat16 or float16 q and caches (tensor cores); "
                           "float32 runs on the CPU only")
    mla = v_cache is None
    if (head_dim_k, dim_v) not in CUDA_FLASH_DECODE_HEAD_DIMS or mla != ((head_dim_k, dim_v) == (576, 512)):
        raise RuntimeError("flash_decode: the CUDA kernel supports (Dk, Dv) = (64, 64), (128, 128), (256, 256) with "
                           f"a v_cache and (576, 512) with v_cache=None (MLA); got ({head_dim_k}, {dim_v}) with "
                           f"{'v_cache=None' if mla else 'a v_cache'} (the CPU kernel takes any head dims)")
    if num_splits > _FLASH_DECODE_MAX_SPLITS:
        raise RuntimeError(f"flash_decode: num_splits must be at most {_FLASH_DECODE_MAX_SPLITS}, got {num_splits}")
    q_dims = tuple(range(q.dim() - 1))  # every dim but the last (Dk)
    for tensor, name, dims in ((q, "q", q_dims), (k_cache, "k_cache", (0, 1, 2)), (v_cache, "v_cache", (0, 1, 2))):
        if tensor is None:
            continue
        element = tensor.element_size()
        offsets = [tensor.storage_offset()] + [tensor.stride(d) for d in dims]
        if any((offset * element) % 16 for offset in offsets):
            raise RuntimeError(f"flash_decode: the CUDA kernel reads {name} in 16-byte rows: its data pointer and its "
                               f"strides {list(tensor.stride())} (except the last) must be multiples of 16 bytes")


_FP4_BLOCK = {"nvfp4": 16, "mxfp4": 32}
_FP4_SCALE_DTYPE = {"nvfp4": torch.float8_e4m3fn, "mxfp4": torch.uint8}


def _fp4_format(op: str, fmt: str) -> int:
    if fmt not in _FP4_BLOCK:
        raise RuntimeError(f'{op}: fmt must be "nvfp4" or "mxfp4", got "{fmt}"')
    return _FP4_BLOCK[fmt]


def quantize_fp4(x: torch.Tensor, fmt: str, global_scale: torch.Tensor | None = None):
    """Quantize a matrix to FP4 (E2M1 codes) with NVFP4 or MXFP4 block scales.

    Rounding is to nearest, ties to even, saturating at +-6; two codes per byte (element 2i
    in the low nibble). NVFP4: one E4M3 scale per 16 elements,
    ``s = e4m3(clamp((block_amax / 6) / global_scale, 2**-9, 448))``, and one fp32
    ``global_scale`` that is a decode **multiplier**: ``x ~= e2m1(q) * float(s) * global_scale``
    (some libraries pass its reciprocal, ``448 * 6 / amax``; this op does not). By default
    ``global_scale = amax / (6 * 448)`` (1.0 when x is all zeros); pass one (a float32
    one-element tensor, e.g. from calibration) to use it instead. MXFP4 (OCP MX v1.0): one
    E8M0 scale per 32 elements, ``2**(floor(log2(block_amax)) - 2)``, no global scale
    (1.0 is returned). No NaN comes out of all-zero blocks or huge values; NaN inputs
    quantize to 0; ``+-inf`` inputs saturate (code +-6 at their block's scale, counted as
    +-FLT_MAX in that block's amax and left out of the tensor's, so every other block is
    unchanged). The computed global scale is never 0 (1.0 when ``amax / 2688`` underflows).
    The CPU and CUDA kernels give identical bits.

    Args:
        x: ``[M, K]`` bfloat16, float16 or float32; K a multiple of 16 (nvfp4) or 32 (mxfp4).
        fmt: ``"nvfp4"`` or ``"mxfp4"``.
        global_scale: nvfp4 only: the decode multiplier to use (finite, > 0).

    Returns:
        ``(packed [M, K/2] uint8, block_scales, global_scale [] float32)`` with block_scales
        ``[M, K/16]`` float8_e4m3fn (nvfp4) or ``[M, K/32]`` uint8 E8M0 codes (mxfp4).
    """
    _require_device_kernel("quantize_fp4", x)
    return torch.ops.helix.quantize_fp4.default(x, fmt, global_scale)


def dequantize_fp4(packed: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor, fmt: str,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of ``quantize_fp4``: ``e2m1(q) * (float(s) * global_scale)`` for nvfp4,
    ``e2m1(q) * 2**(e - 127)`` for mxfp4, computed in fp32 and returned as ``[M, K]`` in
    ``dtype`` (bfloat16, float16 or float32). E8M0 code 0 is ``2**-127``; NaN scale codes
    (e4m3 0x7F/0xFF, e8m0 0xFF) give the dtype's canonical quiet NaN (0x7FC00000, 0x7E00,
    0x7FC0). ``global_scale`` must be finite and positive (checked on the CPU; on CUDA with
    ``HELIX_CHECK_INPUTS=1``). CPU and CUDA give identical bits."""
    _require_device_kernel("dequantize_fp4", packed)
    return torch.ops.helix.dequantize_fp4.default(packed, block_scales, global_scale, fmt, dtype)


def fp4_grouped_gemm(x: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor, w_global_scale: torch.Tensor,
                     offs: torch.Tensor, fmt: str) -> torch.Tensor:
    """Grouped GEMM with FP4 weights: ``y[rows of e] = x[rows of e] @ dequant(w[e]).T``.

    The groups are given like ``torch._grouped_mm``'s ``offs``: cumulative **end** offsets,
    group e owning rows ``offs[e-1]:offs[e]`` (``0:offs[0]`` for e = 0); equal neighbours are
    empty groups; rows past ``offs[-1]`` come out zero. One launch serves every group (E from
    1, a dense FFN shard, to 256 experts) with no host sync on ``offs``, so the op can be
    captured in a CUDA graph; offs values are checked on CPU and, with
    ``HELIX_CHECK_INPUTS=1``, on CUDA. Block scales apply per K block, the per-expert global
    scale once on the output; accumulation is fp32.

    Args:
        x: ``[T, K]`` bfloat16, rows sorted by group.
        w: ``[E, N, K/2]`` uint8 packed FP4 weights (as ``quantize_fp4`` makes them, per expert).
        w_scales: ``[E, N, K/16]`` float8_e4m3fn (nvfp4) or ``[E, N, K/32]`` uint8 (mxfp4).
        w_global_scale: ``[E]`` float32 decode multipliers (1.0 for mxfp4).
        offs: ``[E]`` int32 cumulative end offsets, non-decreasing, ``offs[-1] <= T``.
        fmt: ``"nvfp4"`` or ``"mxfp4"``.

    Returns:
        ``y`` ``[T, N]`` bfloat16.
    """
    _require_device_kernel("fp4_grouped_gemm", x)
    return torch.ops.helix.fp4_grouped_gemm.default(x, w, w_scales, w_global_scale, offs, fmt)


@torch.library.register_fake("helix::quantize_fp4")
def _quantize_fp4_fake(x, fmt, global_scale=None):
    block = _fp4_format("quantize_fp4", fmt)
    if x.dim() != 2:
        raise RuntimeError(f"quantize_fp4: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise RuntimeError(f"quantize_fp4: x must be bfloat16, float16 or float32, got {x.dtype}")
    rows, cols = x.shape
    torch._check(cols % block == 0, lambda: f"quantize_fp4: x's K ({cols}) must be a multiple of the {fmt} block ({block})")
    if global_scale is not None:
        if fmt != "nvfp4":
            raise RuntimeError("quantize_fp4: global_scale applies to nvfp4 only (mxfp4 has none)")
        if global_scale.dtype != torch.float32 or global_scale.numel() != 1:
            raise RuntimeError("quantize_fp4: global_scale must be a float32 tensor with one element, "
                               f"got {global_scale.dtype} with shape {tuple(global_scale.shape)}")
    packed = x.new_empty((rows, cols // 2), dtype=torch.uint8)
    scales = x.new_empty((rows, cols // block), dtype=_FP4_SCALE_DTYPE[fmt])
    return packed, scales, x.new_empty((), dtype=torch.float32)


@torch.library.register_fake("helix::dequantize_fp4")
def _dequantize_fp4_fake(packed, block_scales, global_scale, fmt, dtype):
    block = _fp4_format("dequantize_fp4", fmt)
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise RuntimeError("dequantize_fp4: packed must be a 2-D uint8 tensor [M, K/2], "
                           f"got {packed.dtype} with shape {tuple(packed.shape)}")
    rows, half = packed.shape
    torch._check((2 * half) % block == 0,
                 lambda: f"dequantize_fp4: packed's K ({2 * half}) must be a multiple of the {fmt} block ({block})")
    if block_scales.dtype != _FP4_SCALE_DTYPE[fmt]:
        raise RuntimeError(f"dequantize_fp4: block_scales must be {_FP4_SCALE_DTYPE[fmt]} for {fmt}, "
                           f"got {block_scales.dtype}")
    torch._check(block_scales.dim() == 2 and block_scales.shape[0] == rows and
                 block_scales.shape[1] == 2 * half // block,
                 lambda: f"dequantize_fp4: block_scales must be [M, K/{block}], got {tuple(block_scales.shape)}")
    if global_scale.dtype != torch.float32 or global_scale.numel() != 1:
        raise RuntimeError("dequantize_fp4: global_scale must be a float32 tensor with one element")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise RuntimeError(f"dequantize_fp4: dtype must be bfloat16, float16 or float32, got {dtype}")
    return packed.new_empty((rows, 2 * half), dtype=dtype)


@torch.library.register_fake("helix::fp4_grouped_gemm")
def _fp4_grouped_gemm_fake(x, w, w_scales, w_global_scale, offs, fmt):
    block = _fp4_format("fp4_grouped_gemm", fmt)
    if x.dim() != 2 or x.dtype != torch.bfloat16:
        raise RuntimeError("fp4_grouped_gemm: x must be a 2-D bfloat16 tensor [T, K], "
                           f"got {x.dtype} with shape {tuple(x.shape)}")
    tokens, cols = x.shape
    torch._check(cols % block == 0, lambda: f"fp4_grouped_gemm: x's K ({cols}) must be a multiple of the {fmt} "
                                            f"block ({block})")
    if w.dim() != 3 or w.dtype != torch.uint8:
        raise RuntimeError("fp4_grouped_gemm: w must be a 3-D uint8 tensor [E, N, K/2], "
                           f"got {w.dtype} with shape {tuple(w.shape)}")
    num_experts, n, half = w.shape
    torch._check(half * 2 == cols, lambda: f"fp4_grouped_gemm: w's last dim ({half}) must be K/2 = {cols // 2}")
    if w_scales.dtype != _FP4_SCALE_DTYPE[fmt]:
        raise RuntimeError(f"fp4_grouped_gemm: w_scales must be {_FP4_SCALE_DTYPE[fmt]} for {fmt}, got {w_scales.dtype}")
    torch._check(tuple(w_scales.shape) == (num_experts, n, cols // block),
                 lambda: f"fp4_grouped_gemm: w_scales must be [E, N, K/{block}] = "
                         f"[{num_experts}, {n}, {cols // block}], got {tuple(w_scales.shape)}")
    if w_global_scale.dtype != torch.float32 or w_global_scale.dim() != 1:
        raise RuntimeError("fp4_grouped_gemm: w_global_scale must be a float32 tensor [E]")
    torch._check(w_global_scale.shape[0] == num_experts,
                 lambda: f"fp4_grouped_gemm: w_global_scale must be a float32 tensor [E] = [{num_experts}]")
    if offs.dim() != 1 or offs.dtype != torch.int32:
        raise RuntimeError(f"fp4_grouped_gemm: offs must be an int32 tensor [E] = [{num_experts}] of cumulative "
                           "group end offsets")
    torch._check(offs.shape[0] == num_experts,
                 lambda: f"fp4_grouped_gemm: offs must be an int32 tensor [E] = [{num_experts}] of cumulative "
                         "group end offsets")
    return x.new_empty((tokens, n))


# ----------------------------------------------------------------------------- HOP-B internals
# hopb_signal / hopb_combine / hopb_all_reduce are driven by helix_ext.parallel.FusedExchange and
# PeerAllReduce, which own the symmetric (GPU) or shared (CPU) buffers whose views they pass:
# they are not public API.
INTERNAL_OPS = frozenset({"hopb_signal", "hopb_combine", "hopb_all_reduce"})
_HOPB_MAX_TIMEOUT_S = 3600.0  # csrc/include/helix/hopb.h: kHopbMaxTimeoutSeconds


@torch.library.register_fake("helix::hopb_signal")
def _hopb_signal_fake(flags, epoch, chunk):
    return None


@torch.library.register_fake("helix::hopb_combine")
def _hopb_combine_fake(peer_out, peer_lse, peer_flags, epoch, chunk, timeout_s, error):
    if not peer_out:
        raise RuntimeError("hopb_combine: needs 1 to 32 peers, got 0")
    first = peer_out[0]
    if first.dim() != 3:
        raise RuntimeError(f"hopb_combine: peer_out[0] must be 3-D [rows, heads, D], got {tuple(first.shape)}")
    rows, heads, dim = first.shape
    if not 0 < timeout_s <= _HOPB_MAX_TIMEOUT_S:
        raise RuntimeError(f"hopb_combine: timeout_s must be in (0, {_HOPB_MAX_TIMEOUT_S:g}] seconds (the wait is "
                           f"bounded), got {timeout_s}")
    torch._check(dim >= 1, lambda: f"hopb_combine: peer_out must have a head dim D >= 1, got shape {tuple(first.shape)}")
    return first.new_empty((rows, heads, dim)), first.new_empty((rows, heads), dtype=torch.float32)


@torch.library.register_fake("helix::hopb_all_reduce")
def _hopb_all_reduce_fake(peer_parts, peer_flags, epoch, chunk, timeout_s, error):
    if not peer_parts:
        raise RuntimeError("hopb_all_reduce: needs 1 to 32 peers, got 0")
    if not 0 < timeout_s <= _HOPB_MAX_TIMEOUT_S:
        raise RuntimeError(f"hopb_all_reduce: timeout_s must be in (0, {_HOPB_MAX_TIMEOUT_S:g}] seconds (the wait is "
                           f"bounded), got {timeout_s}")
    return torch.empty_like(peer_parts[0], memory_format=torch.contiguous_format)
