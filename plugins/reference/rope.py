"""Rotary position embedding reference (GPT-NeoX layout: rotate halves).

Frequencies follow the HF definitions for the default, linear and Llama 3
scalings; cos / sin are computed in float32 and cast to the activation dtype
before they are applied, as HF does.
"""
from __future__ import annotations

import math
from typing import Any

import torch


def rope_inv_freq(head_size: int, base: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.int64).float() / head_size))
    if scaling is None or scaling.get("type", scaling.get("rope_type")) == "mrope":   # M-RoPE: default frequencies
        return inv_freq
    kind = scaling.get("type", scaling.get("rope_type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        raise ValueError(f"rotary_scaling.type: {kind!r} is not supported (linear, llama3)")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype,
                 mrope_section: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> cos / sin [T, D]; with `mrope_section`, positions [3, T] (M-RoPE).

    M-RoPE (Qwen2-VL, as HF): the D/2 frequencies are split into chunks of
    mrope_section = (t, h, w) sizes; chunk i takes its angle from axis i % 3
    (time, height, width), then the halves are concatenated as for 1-D RoPE.
    """
    if mrope_section is None:
        freqs = positions.float()[:, None] * inv_freq[None, :]
    else:
        if positions.dim() != 2 or positions.shape[0] != 3 or sum(mrope_section) != inv_freq.shape[0]:
            raise ValueError(f"positions: M-RoPE needs [3, T] positions and a section summing to "
                             f"{inv_freq.shape[0]}, got {tuple(positions.shape)} and {tuple(mrope_section)}")
        per_axis = positions.float()[:, :, None] * inv_freq[None, None, :]      # [3, T, D/2]
        chunks = per_axis.split(list(mrope_section), dim=-1)
        freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D], k: [T, Hkv, D], cos / sin: [T, D]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
