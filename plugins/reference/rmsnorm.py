"""RMSNorm reference: normalise in float32, scale in the input dtype (as HF Llama / Qwen2)."""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add fused with the next norm: returns (rms_norm(x + residual), x + residual).

    The sum is rounded to the activation dtype before it is normalised. Callers use the
    returned residual: a fast implementation may update `residual` in place.
    """
    residual = x + residual
    return rms_norm(residual, weight, eps), residual
