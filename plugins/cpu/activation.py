"""SiLU-and-multiply on CPU as one compiled numba call (the gated MLP of Llama / Qwen2).

What it is for: the CPU op set's `silu_and_mul`; the reference (plugins/reference/activation.py)
is two ATen ops and a temporary per call. silu(g) * u = g / (1 + exp(-g)) * u in the activation
dtype; numba's exp and ATen's vectorised one may differ in the last ulp, so results agree with the
reference within a few ulp (tests/plugins/test_cpu_elementwise.py). gate and up may be strided
views (the two halves of one fused gate/up projection).
float32 / float64 CPU tensors only; anything else goes to the reference.
Not for: CUDA (plugins/triton/norm_act.py).
"""
from __future__ import annotations

import math

import numba
import numpy as np
import torch

from plugins.reference import activation as reference

KERNEL_DTYPES = (torch.float32, torch.float64)


@numba.njit(cache=True, nogil=True)
def _silu_and_mul_kernel(gate: np.ndarray, up: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    num_rows, width = gate.shape
    one = out.dtype.type(1.0)       # keeps float32 arithmetic in float32, as the reference computes it
    for t in range(num_rows):
        for j in range(width):
            g = gate[t, j]
            out[t, j] = g / (one + math.exp(-g)) * up[t, j]


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if (gate.dtype not in KERNEL_DTYPES or up.dtype != gate.dtype or gate.dim() != 2 or up.shape != gate.shape
            or gate.device.type != "cpu" or up.device.type != "cpu"):
        return reference.silu_and_mul(gate, up)
    rows = gate.numpy()
    out = np.empty(rows.shape, rows.dtype)
    _silu_and_mul_kernel(rows, up.numpy(), out)
    return torch.from_numpy(out)
