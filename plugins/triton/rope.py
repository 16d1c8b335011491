"""Triton rotary embedding applied in place to q and k (RoPE and M-RoPE alike).

What it is for: rotating the query and key heads of every token in one kernel,
writing into the q / k views of the fused qkv projection (no copies). The
cos / sin rows come from the reference `rope_cos_sin`, computed once per forward
step in float32 (for M-RoPE it already mixes the time / height / width angles per
frequency section), so one kernel serves both schemes. The angles stay in PyTorch
on purpose: GPU `cos` / `sin` approximations lose accuracy at the large angles of
long positions, and this is a once-per-step [T, head_size] table.
Not for: computing the frequencies (plugins/reference/rope.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_cos,
                 stride_sin, num_q_heads, num_kv_heads, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                 HEADS_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HALF_PAD)
    dmask = d < HALF
    cos1 = tl.load(cos_ptr + token * stride_cos + d, mask=dmask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + token * stride_cos + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + token * stride_sin + d, mask=dmask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + token * stride_sin + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    heads = tl.arange(0, HEADS_PAD)
    # queries
    qmask = (heads[:, None] < num_q_heads) & dmask[None, :]
    q_lo = q_ptr + token * stride_qt + heads[:, None] * stride_qh + d[None, :]
    x1 = tl.load(q_lo, mask=qmask, other=0.0).to(tl.float32)
    x2 = tl.load(q_lo + HALF, mask=qmask, other=0.0).to(tl.float32)
    tl.store(q_lo, (x1 * cos1[None, :] - x2 * sin1[None, :]).to(q_ptr.dtype.element_ty), mask=qmask)
    tl.store(q_lo + HALF, (x2 * cos2[None, :] + x1 * sin2[None, :]).to(q_ptr.dtype.element_ty), mask=qmask)
    # keys
    kmask = (heads[:, None] < num_kv_heads) & dmask[None, :]
    k_lo = k_ptr + token * stride_kt + heads[:, None] * stride_kh + d[None, :]
    y1 = tl.load(k_lo, mask=kmask, other=0.0).to(tl.float32)
    y2 = tl.load(k_lo + HALF, mask=kmask, other=0.0).to(tl.float32)
    tl.store(k_lo, (y1 * cos1[None, :] - y2 * sin1[None, :]).to(k_ptr.dtype.element_ty), mask=kmask)
    tl.store(k_lo + HALF, (y2 * cos2[None, :] + y1 * sin2[None, :]).to(k_ptr.dtype.element_ty), mask=kmask)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D], k: [T, Hkv, D] (strided views allowed, last dim contiguous), cos / sin: [T, D].

    Rotates q and k in place and returns them (GPT-NeoX halves layout).
    """
    num_tokens, num_q_heads, head_size = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_size or head_size % 2:
        raise ValueError(f"k: shape {tuple(k.shape)} does not match q {tuple(q.shape)} (even head size)")
    if cos.shape != (num_tokens, head_size) or sin.shape != cos.shape:
        raise ValueError(f"cos / sin: need shape {(num_tokens, head_size)}, got {tuple(cos.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q, k: the head dimension must be contiguous")
    cos, sin = cos.contiguous(), sin.contiguous()
    half = head_size // 2
    if num_tokens > 0:
        _rope_kernel[(num_tokens,)](q, k, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                    cos.stride(0), sin.stride(0), num_q_heads, k.shape[1], HALF=half,
                                    HALF_PAD=triton.next_power_of_2(half),
                                    HEADS_PAD=triton.next_power_of_2(max(num_q_heads, k.shape[1])), num_warps=4)
    return q, k
