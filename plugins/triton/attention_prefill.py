"""Triton paged attention for prefill, chunked prefill and mixed batches (varlen, causal, over the cache).

What it is for: the attention of any step that is not decode-only. Queries are
packed [T, H, D] by sequence (query_start_loc); keys and values are read from the
paged cache through the block table after this step's keys were written, so a
chunk attends to its cached prefix and causally to itself in one pass: query j of
a sequence with `seq_len` tokens and `query_len` queries sees cache positions
[0, seq_len - query_len + j]. One program computes BLOCK_M queries of one head
with an online softmax over BLOCK_N-token key tiles, and stops at the causal edge.
Reading the cache directly (rather than PyTorch's fused attention over gathered,
contiguous K / V) is what serves chunked prefill and prefix-cache hits without a
per-step copy of the whole context.
Not for: decode-only batches (attention_decode.py splits long contexts and shares
K / V loads across a GQA group), or quantized caches (see kv_cache.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from plugins.triton.attention_decode import cache_layout, dot_precision


@triton.jit
def _prefill_kernel(q_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr,
                    out_ptr, scale, stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_tb, stride_ot,
                    stride_oh, GROUP: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP
    query_start = tl.load(query_start_ptr + seq)
    query_len = tl.load(query_start_ptr + seq + 1) - query_start
    if tile * BLOCK_M < query_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        context_len = seq_len - query_len
        m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = m < query_len
        d = tl.arange(0, HEAD_PAD)
        dmask = d < HEAD_SIZE
        rows = (query_start + m).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + d[None, :],
                    mask=mmask[:, None] & dmask[None, :], other=0.0)
        q_pos = context_len + m                                          # absolute position of each query
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
        kv_end = tl.minimum(seq_len, context_len + (tile + 1) * BLOCK_M)  # the causal edge of this tile
        for n0 in range(0, kv_end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < kv_end
            block = tl.load(block_tables_ptr + seq * stride_tb + n // BLOCK_SIZE, mask=nmask, other=0)
            kv_row = block.to(tl.int64) * stride_cb + (n % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
            kv_mask = nmask[:, None] & dmask[None, :]
            k = tl.load(key_cache_ptr + kv_row[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(value_cache_ptr + kv_row[:, None] + d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale     # [BLOCK_M, BLOCK_N]
            visible = nmask[None, :] & (n[None, :] <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)       # rows past query_len see nothing yet
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        result = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + d[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


def prefill_blocks(max_query_len: int, head_size: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): 16-row query tiles for decode rows and short chunks, 64 otherwise;
    small tiles in the interpreter, where each tile is numpy work."""
    if not on_gpu:
        return 16, 16, 4
    return (64 if max_query_len > 32 else 16), (64 if head_size <= 128 else 32), (4 if head_size <= 64 else 8)


def paged_attention_prefill(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                            max_query_len: int, scale: float) -> torch.Tensor:
    """q: [T, H, D] packed by sequence; seq_lens [B] and query_start_loc [B + 1] int32 on q's device.

    `max_query_len` (host) sizes the grid; returns [T, H, D].
    """
    num_tokens, num_heads, head_size = q.shape
    block_size, num_kv_heads = cache_layout(q, key_cache, value_cache)
    out = torch.empty((num_tokens, num_heads, head_size), dtype=q.dtype, device=q.device)
    num_seqs = block_tables.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_m, block_n, num_warps = prefill_blocks(max_query_len, head_size, q.device.type == "cuda")
    grid = (num_seqs, triton.cdiv(max_query_len, block_m), num_heads)
    _prefill_kernel[grid](q, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out, scale,
                          q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
                          block_tables.stride(0), out.stride(0), out.stride(1), GROUP=num_heads // num_kv_heads,
                          HEAD_SIZE=head_size, HEAD_PAD=max(16, triton.next_power_of_2(head_size)),
                          BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
                          DOT_PRECISION=dot_precision(q.dtype), num_warps=num_warps)
    return out
