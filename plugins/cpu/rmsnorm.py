"""RMSNorm on CPU as one fused ATen call (`F.rms_norm`) instead of six elementwise ops.

What it is for: the CPU op set's `rms_norm` / `add_rms_norm`. For float32 / float64
activations the reference (plugins/reference/rmsnorm.py: normalise in float32, scale in
the input dtype) and the fused op compute the same thing (up to the order of one sum);
tests/plugins/test_cpu_attention.py checks them within 1e-6 on float32. Other dtypes (the reference rounds to the
activation dtype before scaling, the fused op does not) go to the reference.
`add_rms_norm` adds the residual in place (the op set's contract allows it).
Not for: CUDA (plugins/triton/norm_act.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from plugins.reference import rmsnorm as reference

FUSED_DTYPES = (torch.float32, torch.float64)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype not in FUSED_DTYPES or weight.dtype != x.dtype:
        return reference.rms_norm(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); `residual` is updated in place."""
    if x.dtype not in FUSED_DTYPES or residual.dtype != x.dtype:
        return reference.add_rms_norm(x, residual, weight, eps)
    residual = residual.add_(x)
    return rms_norm(residual, weight, eps), residual
