"""Qwen2-VL tower: segment attention batched over runs of equal-length segments equals attention computed
segment by segment in float64, and the float64 block-diagonal mask attention of the exported graph."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.families.qwen2_vl.tower import block_diagonal_mask, segment_attention

EDGE_LISTS = [
    [0, 256],                                   # one image
    [0, 64, 128, 192, 256],                     # four same-size images (one batched call)
    [0, 16, 16, 80, 144, 160, 224, 224, 240],   # mixed lengths, empty segments (Qwen2.5-VL windows)
]


def _per_segment_float64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, edges: list[int]) -> torch.Tensor:
    out = torch.zeros_like(q, dtype=torch.float64)
    for a, b in zip(edges[:-1], edges[1:]):
        if b > a:
            scores = q[:, a:b].double() @ k[:, a:b].double().transpose(1, 2) / q.shape[-1] ** 0.5
            out[:, a:b] = scores.softmax(-1) @ v[:, a:b].double()
    return out


def test_segment_attention_equals_per_segment_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    for edges in EDGE_LISTS:
        q, k, v = (torch.randn(2, edges[-1], 16, generator=generator) for _ in range(3))
        got = segment_attention(q, k, v, edges)
        assert got.shape == q.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), _per_segment_float64(q, k, v, edges), rtol=0, atol=2e-6)
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=block_diagonal_mask(torch.tensor(edges), edges[-1]))
        torch.testing.assert_close(got, masked, rtol=0, atol=2e-6)
