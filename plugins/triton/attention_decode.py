"""Triton paged attention for decode steps: one query token per sequence, split-K over long contexts.

What it is for: the attention of a decode-only batch, reading keys and values
straight from the paged cache through the block table. One program handles all
query heads of one KV head (GQA: the group shares every K / V load) for one split
of the context; with more than one split, a second kernel merges the splits'
partial results by their log-sum-exp (flash-decoding). The number of splits depends
only on static shapes (batch size, block-table width), so the launch is the same on
every replay of a captured CUDA graph; sequence lengths are read from the device.
A sequence of length 0 (a padding row) gets zeros.
Not for: prefill / mixed batches (attention_prefill.py), or quantized caches (see kv_cache.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MIN_TOKENS_PER_SPLIT = 256


@triton.jit
def _decode_kernel(q_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr,
                   part_out_ptr, part_lse_ptr, scale, stride_qb, stride_qh, stride_cb, stride_ct, stride_ch,
                   stride_tb, stride_ob, stride_oh, tokens_per_split, num_splits,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_PAD)
    heads = kv_head * GROUP + g
    gmask = g < GROUP
    dmask = d < HEAD_SIZE
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        block = tl.load(block_tables_ptr + seq * stride_tb + n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
        row = block * stride_cb + (n % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(key_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(value_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale      # [GROUP_PAD, BLOCK_N]
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0
    result = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out_mask = gmask[:, None] & dmask[None, :]
    if SPLIT:
        part = (seq * tl.num_programs(1) * GROUP + heads) * num_splits + split     # [B, H, S] row-major
        tl.store(part_out_ptr + part[:, None] * HEAD_PAD + d[None, :], result, mask=out_mask)
        lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=gmask)
    else:
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh, num_splits,
                         HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_PAD)
    smask = s < num_splits
    base = (seq * tl.num_programs(1) + head) * num_splits
    lse = tl.load(part_lse_ptr + base + s, mask=smask, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp(lse - top)                                           # 0 for empty splits
    part = tl.load(part_out_ptr + (base + s)[:, None] * HEAD_PAD + d[None, :], mask=smask[:, None], other=0.0)
    total = tl.sum(weight, axis=0)
    merged = tl.sum(part * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + d, merged.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_SIZE)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Enough programs to fill the GPU twice over, with at least MIN_TOKENS_PER_SPLIT tokens per split."""
    by_work = -(-max_context // MIN_TOKENS_PER_SPLIT)
    by_occupancy = -(-2 * num_sms // max(1, num_seqs * num_kv_heads))
    return max(1, min(by_work, by_occupancy))


def decode_block_n(head_size: int, on_gpu: bool) -> int:
    """Key tokens per loop step (small in the interpreter, where each step is numpy work)."""
    return (64 if head_size <= 128 else 32) if on_gpu else 16


def dot_precision(dtype: torch.dtype) -> str:
    """float32 models get exact float32 dots (Triton's default for float32 is tf32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def cache_layout(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> tuple[int, int]:
    """(block_size, num_kv_heads) of caches [num_blocks, block_size, num_kv_heads, head_size] that q [T, H, D]
    fits (same head size, H a multiple of the KV heads, q's last dim contiguous, contiguous caches): what both
    kernels index by; ValueError otherwise."""
    num_heads, head_size = q.shape[1:]
    _, block_size, num_kv_heads, cache_head_size = key_cache.shape
    if cache_head_size != head_size or num_heads % num_kv_heads or q.stride(-1) != 1:
        raise ValueError(f"q: {num_heads} heads of size {head_size} (contiguous last dim) do not fit a cache of "
                         f"{num_kv_heads} heads of size {cache_head_size}")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("key_cache / value_cache: must be contiguous")
    return block_size, num_kv_heads


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4        # interpreter: a small "machine", so the split path is exercised


def paged_attention_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           num_splits: int | None = None, max_context: int | None = None) -> torch.Tensor:
    """q: [B, H, D] (one token per sequence); seq_lens: [B] int32 on q's device; returns [B, H, D].

    `max_context`: the longest context split-K plans for (None: the block-table width); no sequence
    may be longer. `num_splits`: None picks from the static shapes (choose_num_splits); tests force it.
    """
    num_seqs, num_heads, head_size = q.shape
    block_size, num_kv_heads = cache_layout(q, key_cache, value_cache)
    out = torch.empty((num_seqs, num_heads, head_size), dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    max_context = max_context or block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_context, _num_sms(q.device))
    block_n = decode_block_n(head_size, q.device.type == "cuda")
    tokens_per_split = triton.cdiv(triton.cdiv(max_context, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_context, tokens_per_split)
    head_pad = max(16, triton.next_power_of_2(head_size))
    split = num_splits > 1
    part_out = torch.empty((num_seqs, num_heads, num_splits, head_pad) if split else (1,),
                           dtype=torch.float32, device=q.device)
    part_lse = torch.empty((num_seqs, num_heads, num_splits) if split else (1,), dtype=torch.float32,
                           device=q.device)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, key_cache, value_cache, block_tables, seq_lens, out, part_out, part_lse, scale,
        q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), tokens_per_split, num_splits,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_SIZE=head_size, HEAD_PAD=head_pad,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, SPLIT=split, DOT_PRECISION=dot_precision(q.dtype), num_warps=4)
    if split:
        _merge_splits_kernel[(num_seqs, num_heads)](part_out, part_lse, out, out.stride(0), out.stride(1),
                                                    num_splits, HEAD_SIZE=head_size, HEAD_PAD=head_pad,
                                                    SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4)
    return out
