"""Rotary position embedding on CPU: q and k rotated in place by one compiled numba call.

What it is for: the CPU op set's `apply_rope` (the reference, plugins/reference/rope.py, takes
about fourteen ATen ops per call on q and k: slices, negations, concatenations, products). The
kernel computes each element exactly as the reference does (x1 * cos - x2 * sin,
x2 * cos + x1 * sin in the activation dtype, no fused multiply-add), so its results equal the
reference's bit for bit (tests/plugins/test_cpu_elementwise.py). q and k may be strided views
(the columns of one fused qkv projection); they are rotated where they lie and returned.
float32 / float64 CPU tensors with cos / sin of the same dtype only; anything else goes to the reference.
Not for: the cos / sin tables (runtime/executor/model.py keeps them per position), CUDA (plugins/triton/rope.py).
"""
from __future__ import annotations

import numba
import numpy as np
import torch

from plugins.reference import rope as reference

KERNEL_DTYPES = (torch.float32, torch.float64)


@numba.njit(cache=True, nogil=True)
def _rotate_kernel(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:  # pragma: no cover - compiled
    num_tokens, num_heads, head_size = x.shape
    half = head_size // 2
    for t in range(num_tokens):
        for h in range(num_heads):
            for d in range(half):
                x1, x2 = x[t, h, d], x[t, h, d + half]
                x[t, h, d] = x1 * cos[t, d] - x2 * sin[t, d]
                x[t, h, d + half] = x2 * cos[t, d + half] + x1 * sin[t, d + half]


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D], k: [T, Hkv, D], cos / sin: [T, D]; rotates q and k in place and returns them."""
    if not (_kernel_reads(q, cos, sin) and _kernel_reads(k, cos, sin)):
        return reference.apply_rope(q, k, cos, sin)
    cos_rows, sin_rows = cos.numpy(), sin.numpy()
    _rotate_kernel(q.numpy(), cos_rows, sin_rows)
    _rotate_kernel(k.numpy(), cos_rows, sin_rows)
    return q, k


def _kernel_reads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    return (x.dtype in KERNEL_DTYPES and cos.dtype == x.dtype and sin.dtype == x.dtype and x.dim() == 3
            and x.is_cpu and cos.is_cpu and sin.is_cpu
            and cos.shape == (x.shape[0], x.shape[2]) and sin.shape == cos.shape and x.shape[2] % 2 == 0)
