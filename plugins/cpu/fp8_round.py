"""FP8 activations on CPU: float32 values rounded through float8_e4m3fn with a static scale, in one numba pass.

What it is for: the input of the FP8 linear layer on CPU (runtime/executor/quant_linear.py
FP8Linear), `y = float32(fp8_e4m3fn(clamp(x / s, -448, 448))) * s`, bit-identical to
torch's `(x / s).clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float32) * s` (NaN stays
NaN, signed zeros kept), without torch's float8 conversions, which are scalar code on a CPU
without fp8, and in one call instead of five. The rounding is round-to-nearest-even on the
e4m3 grid: spacing 2^-9 below 2^-5 (subnormals and the first binade), else 2^(exponent - 3).
Exactness: x / s is computed in float64 and rounded once to float32, which equals float32
division; every other step is exact. tests/plugins/test_cpu_fp8_round.py compares
the two on every e4m3 value, the midpoints between them and their neighbours, and random values.
Not for: other dtypes (bfloat16 engines keep the torch expression), CUDA (torch._scaled_mm).
"""
from __future__ import annotations

import math

import numba
import numpy as np
import torch

FP8_MAX = 448.0
MAGIC = 6755399441055744.0          # 2^52 + 2^51: (y + MAGIC) - MAGIC is y rounded to nearest-even, |y| < 2^51


def _spacings() -> np.ndarray:
    """The e4m3 grid spacing for a float32 of each biased exponent field: 2^-9 below 2^-5 (subnormals and
    the first normal binade), else an eighth of the binade's lower bound (3 mantissa bits)."""
    fields = np.arange(256)
    return np.ldexp(1.0, np.maximum(fields - 127, -6) - 3).astype(np.float64)


SPACINGS = _spacings()              # read-only lookup table (numba freezes it as a constant)


@numba.njit(cache=True, nogil=True)
def _round_kernel(x: np.ndarray, scale: float, out: np.ndarray) -> None:  # pragma: no cover - compiled
    s64 = np.float64(np.float32(scale))
    bits = out.view(np.int32)
    for i in range(x.shape[0]):
        v = np.float64(np.float32(np.float64(x[i]) / s64))        # float32 division
        if v != v:                                                 # NaN
            out[i] = np.float32(v)
            continue
        v = min(max(v, -FP8_MAX), FP8_MAX)
        a = abs(v)
        out[i] = np.float32(a)                                     # exact: read its exponent field
        spacing = SPACINGS[(bits[i] >> 23) & 0xFF]
        rounded = math.copysign(((a / spacing + MAGIC) - MAGIC) * spacing, v)
        out[i] = np.float32(rounded * s64)                         # exact product, rounded once to float32


def round_through_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: float32 CPU tensor, scale: float32 [1]; returns x rounded through e4m3 at `scale`, same shape."""
    flat = x.contiguous().view(-1)
    out = torch.empty_like(flat)
    _round_kernel(flat.numpy(), float(scale), out.numpy())
    return out.view(x.shape)
