"""The benchmarked shapes of every op, their byte counts and their peers.

Each case builds fresh random inputs (never zeros), a call of the helix op, a call of the
best peer available on the same machine, and the bytes that must move at least once
(inputs read, outputs written).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import helix_ext
from helix_ext.reference import merge_states_reference

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass
class Case:
    op: str
    shape: str
    bytes_moved: int
    run: Callable[[], object]
    peer_name: str
    peer: Callable[[], object] | None


def merge_states_case(num_parts: int, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                      device: str) -> Case:
    parts_out = torch.randn(num_parts, batch, heads, head_dim, dtype=dtype, device=device)
    parts_lse = torch.randn(num_parts, batch, heads, device=device) * 4
    element = parts_out.element_size()
    rows = batch * heads
    bytes_moved = (num_parts * rows * head_dim * element + num_parts * rows * 4  # read parts
                   + rows * head_dim * element + rows * 4)  # write the merged state
    return Case(
        op="merge_states",
        shape=f"P={num_parts},B={batch},H={heads},D={head_dim},{_DTYPE_NAMES[dtype]}",
        bytes_moved=bytes_moved,
        run=lambda: helix_ext.merge_states(parts_out, parts_lse),
        peer_name="eager torch (same math, fp32)",
        peer=lambda: merge_states_reference(parts_out, parts_lse, compute_dtype=torch.float32),
    )


# The standard shape of each op (the one the cupy cross-check times) comes first.
STANDARD = {
    "merge_states": dict(num_parts=8, batch=64, heads=128, head_dim=512, dtype=torch.bfloat16),
}
EXTRA = {
    "merge_states": [
        dict(num_parts=2, batch=64, heads=128, head_dim=512, dtype=torch.bfloat16),
        dict(num_parts=4, batch=32, heads=32, head_dim=128, dtype=torch.bfloat16),
        dict(num_parts=16, batch=8, heads=64, head_dim=512, dtype=torch.float16),
        dict(num_parts=8, batch=64, heads=32, head_dim=128, dtype=torch.float32),
    ],
}
# Tiny shapes for checking the harness itself (tests, --smoke), not for numbers.
SMOKE = {
    "merge_states": [dict(num_parts=3, batch=2, heads=4, head_dim=64, dtype=torch.bfloat16)],
}
BUILDERS = {"merge_states": merge_states_case}


def cases(device: str, mode: str) -> list[Case]:
    """mode: 'smoke', 'quick' (standard shapes) or 'full' (standard + extra shapes)."""
    result = []
    for op, builder in BUILDERS.items():
        if mode == "smoke":
            shapes = SMOKE[op]
        elif mode == "quick":
            shapes = [STANDARD[op]]
        else:
            shapes = [STANDARD[op]] + EXTRA[op]
        result.extend(builder(device=device, **shape) for shape in shapes)
    return result
