"""y = x W^T (+ b) for a few rows of x on CPU: one numba kernel over register tiles of 4 rows x 4 outputs.

What it is for: the decoder's float32 linears on a decode step of a few sequences (`SKINNY_ROWS`: 4-24 rows),
where the weight comes from memory each step (MiBs per layer) and MKL's GEMM reaches about a third of the
bandwidth: it packs the weight into panels for every call, an extra pass over it. This kernel reads each
weight row once straight from the checkpoint's [N, K] layout and keeps 16 partial sums (4 rows x 4 outputs) in
vector registers over K: a block of 4 weight rows and 4 input rows costs 8 loads per 16 multiply-adds.
Measured (2 threads, 8 layers of small-qwen2's four linears, distinct weights so none stays in cache, median
of 9): 16 rows 9.47 -> 7.70 ms, 8 rows 6.44 -> 5.44, 4 rows 4.79 -> 4.33; 32 rows equal, 1 row slower.
While it computes one block of 4 outputs it prefetches the block two ahead (`PREFETCH_AHEAD` rows, spread over
its row tiles; plugins/cpu/prefetch.py): a block's first row tile reads 4 new weight rows in a burst and the
other tiles read them from L1, which the hardware prefetcher does not run ahead of. Same layers, cold weights,
2 threads: 16 rows 6.4 -> 4.8-5.3 ms, 8 rows 3.8-4.2 -> 3.3-3.6; 1 thread 16 rows 14.0-14.3 -> 9.7-9.9
(1 ahead was slower at 1 thread, 4 and 8 ahead equal, into L1 slower).
Sums run in float32 in another order than MKL's: within float32 rounding of the float64 product (tested).
The outputs are split over the step's torch threads (numba's prange on the same OpenMP pool) in runs of
whole 4-output blocks, one run per thread, so every output is computed the same way whatever the count.
Not for: other dtypes, strided weights or more rows (FloatLinear calls MKL there), CUDA.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

from plugins.cpu import use_step_threads
from plugins.cpu.prefetch import prefetch_l2

SKINNY_ROWS = (4, 24)       # rows of x (inclusive) this kernel takes; MKL outside
PREFETCH_AHEAD = 8          # weight rows between the block computed and the block prefetched


@numba.njit(fastmath={"reassoc", "contract", "arcp", "nsz"}, error_model="numpy", cache=True, nogil=True)
def _block(x: np.ndarray, w: np.ndarray, bias: np.ndarray, has_bias: bool, out: np.ndarray,
           n: int, prefetch_end: int) -> None:  # pragma: no cover - compiled
    """Outputs n..n+3 of every row (n + 4 <= N): rows in tiles of 4, the last M % 4 rows one at a time. Each
    row tile also prefetches its share of weight rows n + PREFETCH_AHEAD .. +3 (not past row `prefetch_end`)."""
    num_rows, size = x.shape
    zero = out.dtype.type(0.0)
    b0, b1, b2, b3 = zero, zero, zero, zero
    if has_bias:
        b0, b1, b2, b3 = bias[n], bias[n + 1], bias[n + 2], bias[n + 3]
    line = 64 // w.itemsize                                  # elements per cache line
    ahead = min(n + PREFETCH_AHEAD, prefetch_end) * size     # flat element index: w is contiguous
    ahead_end = min(n + PREFETCH_AHEAD + 4, prefetch_end) * size
    per_tile = -(-(ahead_end - ahead) // (max(num_rows // 4, 1) * line)) * line
    m = 0
    while m + 4 <= num_rows:
        for element in range(ahead, min(ahead + per_tile, ahead_end), line):
            prefetch_l2(w, element)
        ahead += per_tile
        a00, a01, a02, a03 = zero, zero, zero, zero
        a10, a11, a12, a13 = zero, zero, zero, zero
        a20, a21, a22, a23 = zero, zero, zero, zero
        a30, a31, a32, a33 = zero, zero, zero, zero
        for k in range(size):
            w0, w1, w2, w3 = w[n, k], w[n + 1, k], w[n + 2, k], w[n + 3, k]
            x0, x1, x2, x3 = x[m, k], x[m + 1, k], x[m + 2, k], x[m + 3, k]
            a00 += x0 * w0
            a01 += x0 * w1
            a02 += x0 * w2
            a03 += x0 * w3
            a10 += x1 * w0
            a11 += x1 * w1
            a12 += x1 * w2
            a13 += x1 * w3
            a20 += x2 * w0
            a21 += x2 * w1
            a22 += x2 * w2
            a23 += x2 * w3
            a30 += x3 * w0
            a31 += x3 * w1
            a32 += x3 * w2
            a33 += x3 * w3
        out[m, n], out[m, n + 1], out[m, n + 2], out[m, n + 3] = a00 + b0, a01 + b1, a02 + b2, a03 + b3
        out[m + 1, n], out[m + 1, n + 1], out[m + 1, n + 2], out[m + 1, n + 3] = a10 + b0, a11 + b1, a12 + b2, a13 + b3
        out[m + 2, n], out[m + 2, n + 1], out[m + 2, n + 2], out[m + 2, n + 3] = a20 + b0, a21 + b1, a22 + b2, a23 + b3
        out[m + 3, n], out[m + 3, n + 1], out[m + 3, n + 2], out[m + 3, n + 3] = a30 + b0, a31 + b1, a32 + b2, a33 + b3
        m += 4
    for row in range(m, num_rows):
        a0, a1, a2, a3 = zero, zero, zero, zero
        for k in range(size):
            xv = x[row, k]
            a0 += xv * w[n, k]
            a1 += xv * w[n + 1, k]
            a2 += xv * w[n + 2, k]
            a3 += xv * w[n + 3, k]
        out[row, n], out[row, n + 1], out[row, n + 2], out[row, n + 3] = a0 + b0, a1 + b1, a2 + b2, a3 + b3


@numba.njit(fastmath={"reassoc", "contract", "arcp", "nsz"}, error_model="numpy", cache=True, nogil=True)
def _tail(x: np.ndarray, w: np.ndarray, bias: np.ndarray, has_bias: bool, out: np.ndarray,
          first: int) -> None:  # pragma: no cover - compiled
    """Outputs first..N-1 (fewer than 4) of every row."""
    zero = out.dtype.type(0.0)
    for n in range(first, w.shape[0]):
        for row in range(x.shape[0]):
            acc = zero
            for k in range(x.shape[1]):
                acc += x[row, k] * w[n, k]
            out[row, n] = acc + bias[n] if has_bias else acc


@numba.njit(parallel=True, cache=True, nogil=True)
def _skinny_parallel(x: np.ndarray, w: np.ndarray, bias: np.ndarray, has_bias: bool, out: np.ndarray,
                     threads: int) -> None:  # pragma: no cover - compiled
    num_blocks = w.shape[0] // 4
    for run in numba.prange(threads):
        for block in range(run * num_blocks // threads, (run + 1) * num_blocks // threads):
            _block(x, w, bias, has_bias, out, 4 * block, 4 * ((run + 1) * num_blocks // threads))
    _tail(x, w, bias, has_bias, out, 4 * num_blocks)


@numba.njit(cache=True, nogil=True)
def _skinny_serial(x: np.ndarray, w: np.ndarray, bias: np.ndarray, has_bias: bool,
                   out: np.ndarray) -> None:  # pragma: no cover - compiled
    num_blocks = w.shape[0] // 4
    for block in range(num_blocks):
        _block(x, w, bias, has_bias, out, 4 * block, w.shape[0])
    _tail(x, w, bias, has_bias, out, 4 * num_blocks)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T + bias [N], on the step's threads. float32 CPU tensors, weight and bias
    contiguous (runtime/executor/quant_linear.FloatLinear checks once, at load), M in SKINNY_ROWS."""
    rows = x.contiguous().numpy()
    out = np.empty((rows.shape[0], weight.shape[0]), np.float32)
    has_bias = bias is not None
    bias_values = bias.numpy() if bias is not None else _NO_BIAS
    threads = use_step_threads()
    if threads > 1:
        _skinny_parallel(rows, weight.numpy(), bias_values, has_bias, out, threads)
    else:
        _skinny_serial(rows, weight.numpy(), bias_values, has_bias, out)
    return torch.from_numpy(out)


_NO_BIAS = np.zeros(0, np.float32)       # read-only: the bias argument of a call without one
_NO_BIAS.flags.writeable = False
