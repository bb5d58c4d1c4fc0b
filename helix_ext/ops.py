"""Typed Python wrappers of ``torch.ops.helix.*``, and their fake (meta) kernels.

Each wrapper documents its op's contract (see shared DESIGN.md section 3); the fake
kernels let ``torch.compile`` and ``torch.library.opcheck`` trace the ops without running
them, and check the same shapes and dtypes as the native kernels.
"""

from __future__ import annotations

import torch

from helix_ext._build_info import CUDA_BUILT, CUDA_SKIP_REASON

_MERGE_STATES_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _require_device_kernel(op: str, tensor: torch.Tensor) -> None:
    # Fail loudly, naming the cause, instead of the dispatcher's generic "no kernel" error.
    if tensor.is_cuda and not CUDA_BUILT:
        raise RuntimeError(
            f"helix.{op}: helix_ext was built without CUDA kernels ({CUDA_SKIP_REASON}); "
            "rebuild with a CUDA build of torch and a CUDA toolkit")


def merge_states(parts_out: torch.Tensor, parts_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge P partial attention states exactly (the log-sum-exp merge of Helix's exchange).

    For every (b, h): ``lse = log(sum_p exp(parts_lse[p, b, h]))`` and
    ``out = sum_p exp(parts_lse[p, b, h] - lse) * parts_out[p, b, h]``, computed in fp32.
    A part whose LSE is ``-inf`` is absent (a KV shard with no tokens): it contributes
    nothing and its ``parts_out`` values are never read, so they may be garbage. A row
    with every part absent gives ``out = 0`` and ``lse = -inf``, never NaN. LSE values of
    any finite magnitude (e.g. +-1000) are safe; ``+inf`` or NaN LSEs give NaN.

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
