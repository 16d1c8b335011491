"""RMSNorm and the residual add fused with it, on CPU, as one compiled numba call per norm.

What it is for: the CPU op set's `rms_norm` / `add_rms_norm`. On a decode step the tensors are
tiny ([batch, hidden]) and every ATen call costs microseconds of dispatch: `F.rms_norm` on CPU
decomposes into about eight ATen ops (measured side by side on the loaded 2-core dev machine, one
thread, best of 10 rounds: [16, 64] 15 us against 2 us for this kernel, [16, 896] 20 us against
5 us). Each row is one pass for the sum of squares (float64 accumulator) and one for the scaled output; `add_rms_norm` also writes `x + residual` into `residual` in place
(the op set's contract allows it), rounded to the activation dtype before it is normalised, as
the reference does. The inverse RMS is rounded to the activation dtype and applied as the
reference does (normalise, then scale by the weight), so float32 results agree with
plugins/reference/rmsnorm.py within a few ulp (tests/plugins/test_cpu_elementwise.py).
float32 / float64 only (numba has no bfloat16; the reference rounds to a narrow activation dtype
before scaling): other dtypes, non-CPU tensors and mismatched weight dtypes go to the reference.
Not for: CUDA (plugins/triton/norm_act.py).
"""
from __future__ import annotations

import math

import numba
import numpy as np
import torch

from plugins.reference import rmsnorm as reference

KERNEL_DTYPES = (torch.float32, torch.float64)

# Reassociation lets LLVM vectorise the sum of squares (measured 3x faster at [16, 896] than the serial
# sum); no nnan / ninf, so a NaN or inf in a row still propagates to its output as in the reference.


@numba.njit(fastmath={"reassoc", "contract", "arcp", "nsz"}, cache=True, nogil=True)
def _rms_norm_kernel(x: np.ndarray, weight: np.ndarray, eps: float,
                     out: np.ndarray) -> None:  # pragma: no cover - compiled
    num_rows, hidden = x.shape
    for t in range(num_rows):
        total = 0.0
        for j in range(hidden):
            total += float(x[t, j]) * float(x[t, j])
        inv_rms = out.dtype.type(1.0 / math.sqrt(total / hidden + eps))
        for j in range(hidden):
            out[t, j] = weight[j] * (x[t, j] * inv_rms)


@numba.njit(fastmath={"reassoc", "contract", "arcp", "nsz"}, cache=True, nogil=True)
def _add_rms_norm_kernel(x: np.ndarray, residual: np.ndarray, weight: np.ndarray, eps: float,
                         out: np.ndarray) -> None:  # pragma: no cover - compiled
    num_rows, hidden = x.shape
    for t in range(num_rows):
        total = 0.0
        for j in range(hidden):
            value = x[t, j] + residual[t, j]
            residual[t, j] = value
            total += float(value) * float(value)
        inv_rms = out.dtype.type(1.0 / math.sqrt(total / hidden + eps))
        for j in range(hidden):
            out[t, j] = weight[j] * (residual[t, j] * inv_rms)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if not _kernel_reads(x, weight):
        return reference.rms_norm(x, weight, eps)
    rows = x.numpy()
    # numpy allocates the output: measured cheaper per call than torch.empty on the dev machine
    out = np.empty(rows.shape, rows.dtype)
    _rms_norm_kernel(rows, weight.numpy(), eps, out)
    return torch.from_numpy(out)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); `residual` is updated in place."""
    if not _kernel_reads(x, weight) or residual.dtype != x.dtype or residual.shape != x.shape:
        return reference.add_rms_norm(x, residual, weight, eps)
    rows = x.numpy()
    out = np.empty(rows.shape, rows.dtype)
    _add_rms_norm_kernel(rows, residual.numpy(), weight.numpy(), eps, out)
    return torch.from_numpy(out), residual


def _kernel_reads(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """2-D [rows, hidden] CPU activations of a kernel dtype, a matching [hidden] weight."""
    return (x.dtype in KERNEL_DTYPES and weight.dtype == x.dtype and x.dim() == 2 and x.is_cpu
            and weight.is_cpu and weight.shape == (x.shape[1],))
