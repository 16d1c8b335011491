"""Triton GEMMs for weight-only quantized linears on CUDA: W8A16 (int8 per channel) and W4A16 (int4 groups).

What it is for: y[M, N] = x[M, K] @ dequant(W)^T reading the weights in their
stored width: int8 [N, K] with a scale per output row (W8A16), or int4 packed
two per byte along N ([N/2, K] int8, row 2i in the low nibble, as the
checkpoint stores it) with a scale per (row, group of K) (W4A16 AWQ; the
activation's pre-quant scale is applied by the caller). Weights are widened
inside the tile, never in memory. The kernels also run on CPU tensors in
Triton's interpreter (TRITON_INTERPRET=1), which is how the tests check them;
there the dot runs in float32 (the interpreter's bf16 dot returns wrong values).
Not for: choosing a kernel per device (runtime/executor/quant_linear.py) or the CPU paths (torch ops).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32


@triton.jit
def _w8a16_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_FP32: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :] * K + rk[:, None], mask=(rn[None, :] < N) & (rk[:, None] < K), other=0)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    scale = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _w4a16_kernel(x_ptr, p_ptr, s_ptr, y_ptr, M, N, K, G,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_FP32: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    num_groups = K // G
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        wmask = (rn[None, :] < N) & (rk[:, None] < K)
        packed = tl.load(p_ptr + (rn[None, :] // 2) * K + rk[:, None], mask=wmask, other=0)
        low = (packed << 4) >> 4                    # int8 arithmetic shifts sign-extend the nibble
        high = packed >> 4
        q = tl.where((rn[None, :] % 2) == 0, low, high)
        scale = tl.load(s_ptr + rn[None, :] * num_groups + rk[:, None] // G, mask=wmask, other=0.0)
        w = q.to(tl.float32) * scale.to(tl.float32)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _grid(m: int, n: int) -> tuple[int, int]:
    return triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N)


def _dot_fp32(x: torch.Tensor) -> bool:
    """float32 dots for float32 activations and in the CPU interpreter (whose bf16 dot is wrong)."""
    return x.device.type == "cpu" or x.dtype == torch.float32


def w8a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (fp32 / fp16 / bf16), qweight int8 [N, K], scale [N] -> [M, N] in x's dtype."""
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    if qweight.shape[1] != k or scale.shape != (n,):
        raise ValueError(f"w8a16_matmul: x {list(x.shape)}, qweight {list(qweight.shape)}, scale {list(scale.shape)}")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _w8a16_kernel[_grid(m, n)](x, qweight.contiguous(), scale.contiguous(), y, m, n, k,
                               BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K, DOT_FP32=_dot_fp32(x))
    return y


def w4a16_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [M, K], packed int8 [N/2, K] (two int4 per byte along N), scales [N, K/G] -> [M, N] in x's dtype."""
    x = x.contiguous()
    m, k = x.shape
    n = packed.shape[0] * 2
    if packed.shape[1] != k or k % group_size or scales.shape != (n, k // group_size):
        raise ValueError(f"w4a16_matmul: x {list(x.shape)}, packed {list(packed.shape)}, scales "
                         f"{list(scales.shape)}, group_size {group_size}")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _w4a16_kernel[_grid(m, n)](x, packed.contiguous(), scales.contiguous(), y, m, n, k, group_size,
                               BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K, DOT_FP32=_dot_fp32(x))
    return y
