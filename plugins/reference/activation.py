"""SiLU-and-multiply reference (the gated MLP of Llama / Qwen2): silu(gate) * up in the activation dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
