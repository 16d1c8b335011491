"""Triton KV-cache write: each token's key and value heads into its slot of the paged cache.

What it is for: the one write into the cache per layer and step. A negative slot
means "no slot" (the padding rows of a captured CUDA-graph batch) and is skipped.
The cache is [num_blocks, block_size, num_kv_heads, head_size] per layer; slot s is
row s of the flattened [num_blocks * block_size] view.
Not for: quantized (int8 / FP8) caches: that belongs to the quantization work, which
adds a scale argument here (divide, round, clamp) and in the attention kernels'
cache loads (multiply); every load already goes through float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, key_cache_ptr, value_cache_ptr, slot_ptr, stride_kt, stride_kh,
                     stride_vt, stride_vh, stride_slot, num_kv_heads, HEAD_SIZE: tl.constexpr,
                     HEAD_PAD: tl.constexpr, HEADS_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        heads = tl.arange(0, HEADS_PAD)
        d = tl.arange(0, HEAD_PAD)
        mask = (heads[:, None] < num_kv_heads) & (d[None, :] < HEAD_SIZE)
        src = heads[:, None] * stride_kh + d[None, :]
        dst = slot * stride_slot + heads[:, None] * HEAD_SIZE + d[None, :]
        k = tl.load(k_ptr + token * stride_kt + src, mask=mask)
        tl.store(key_cache_ptr + dst, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
        vsrc = heads[:, None] * stride_vh + d[None, :]
        v = tl.load(v_ptr + token * stride_vt + vsrc, mask=mask)
        tl.store(value_cache_ptr + dst, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(key_cache: torch.Tensor, value_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] (strided views allowed, last dim contiguous); slot_mapping: [T], -1 to skip."""
    num_tokens, num_kv_heads, head_size = k.shape
    if key_cache.shape != value_cache.shape or tuple(key_cache.shape[2:]) != (num_kv_heads, head_size):
        raise ValueError(f"key_cache / value_cache: shape {tuple(key_cache.shape)} does not hold "
                         f"{num_kv_heads} heads of size {head_size}")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("key_cache / value_cache: must be contiguous")
    if v.shape != k.shape or slot_mapping.shape != (num_tokens,) or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"v / slot_mapping: need v {tuple(k.shape)} and slot_mapping ({num_tokens},) "
                         "with a contiguous head dimension")
    if num_tokens > 0:
        _write_kv_kernel[(num_tokens,)](k, v, key_cache, value_cache, slot_mapping, k.stride(0), k.stride(1),
                                        v.stride(0), v.stride(1), num_kv_heads * head_size, num_kv_heads,
                                        HEAD_SIZE=head_size, HEAD_PAD=triton.next_power_of_2(head_size),
                                        HEADS_PAD=triton.next_power_of_2(num_kv_heads), num_warps=4)
