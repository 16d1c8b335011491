"""Triton RMSNorm (optionally fused with the residual add) and SiLU-and-multiply.

What it is for: the element-wise ops of a decoder layer, one kernel each, with the
reference ops' rounding: the residual sum is rounded to the activation dtype before
it is normalised; RMS is taken in float32; the weight multiplies the value already
rounded to the activation dtype (as HF Llama / Qwen2 and plugins/reference/rmsnorm.py).
Not for: the reference semantics themselves (plugins/reference).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_res, stride_out, num_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < num_cols
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + res).to(dtype).to(tl.float32)
        tl.store(res_ptr + row * stride_res + cols, x.to(dtype), mask=mask)
    variance = tl.sum(x * x, axis=0) / num_cols
    normed = (x * tl.rsqrt(variance + eps)).to(dtype).to(tl.float32)
    weight = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (weight * normed).to(dtype), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D tensor with unit column stride (a view where possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
    rows = _rows(x)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    res = rows if residual is None else residual
    num_cols = rows.shape[1]
    block = triton.next_power_of_2(num_cols)
    if rows.shape[0] > 0:
        _rms_norm_kernel[(rows.shape[0],)](rows, res, weight, out, rows.stride(0), res.stride(0), out.stride(0),
                                           num_cols, eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
                                           num_warps=min(max(block // 256, 1), 8))
    return out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch_rms_norm(x, None, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x (in place, rounded to the dtype); returns (rms_norm(residual), residual)."""
    if residual.shape != x.shape or residual.dtype != x.dtype or not residual.is_contiguous():
        raise ValueError(f"residual: needs a contiguous {x.dtype} tensor of shape {tuple(x.shape)}, "
                         f"got {residual.dtype} {tuple(residual.shape)}")
    res2 = residual.view(-1, residual.shape[-1])
    return _launch_rms_norm(x, res2, weight, eps), residual


@triton.jit
def _silu_and_mul_kernel(gate_ptr, up_ptr, out_ptr, stride_gate, stride_up, stride_out, num_cols,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < num_cols
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(dtype), mask=mask)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, each rounded to the dtype as F.silu(gate) * up."""
    if gate.shape != up.shape:
        raise ValueError(f"up: shape {tuple(up.shape)} differs from gate {tuple(gate.shape)}")
    g, u = _rows(gate), _rows(up)
    out = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
    block = min(triton.next_power_of_2(g.shape[1]), 1024)
    if g.shape[0] > 0:
        grid = (g.shape[0], triton.cdiv(g.shape[1], block))
        _silu_and_mul_kernel[grid](g, u, out, g.stride(0), u.stride(0), out.stride(0), g.shape[1], BLOCK=block,
                                   num_warps=4)
    return out.view(gate.shape)
