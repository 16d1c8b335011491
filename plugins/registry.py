"""Pick the implementation of each custom op for a device.

What it is for: the one place where the executor gets its ops, so GPU kernels
(Triton) and TensorRT plugins can be added later without touching the model
code. Today every device gets the reference implementations.
Not for: the op implementations themselves (plugins/reference, later plugins/triton).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from plugins.reference import paged_attention, rmsnorm, rope


@dataclass(frozen=True, slots=True)
class OpSet:
    name: str
    rms_norm: Callable[..., torch.Tensor]
    rope_cos_sin: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    apply_rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    write_kv_cache: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]


REFERENCE_OPS = OpSet(
    name="reference",
    rms_norm=rmsnorm.rms_norm,
    rope_cos_sin=rope.rope_cos_sin,
    apply_rope=rope.apply_rope,
    write_kv_cache=paged_attention.write_kv_cache,
    paged_attention=paged_attention.paged_attention,
)


def get_ops(device: torch.device, backend: str = "auto") -> OpSet:
    """Return the op set for `device`. `backend`: "auto" or "reference"."""
    if backend not in ("auto", "reference"):
        raise ValueError(f"backend: unknown op backend {backend!r} (auto, reference)")
    return REFERENCE_OPS
