"""Paged attention reference: KV cache write by slot, causal attention over block tables.

The cache of one layer is two tensors [num_blocks, block_size, num_kv_heads,
head_size]; token slot s lives at block s // block_size, offset s % block_size.
A sequence with `seq_len` known tokens of which the last `query_len` are in
this step attends, for its query j, to cache positions [0, seq_len - query_len + j].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_cache(key_cache: torch.Tensor, value_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    num_kv_heads, head_size = key_cache.shape[-2:]
    key_cache.view(-1, num_kv_heads, head_size).index_copy_(0, slot_mapping, k)
    value_cache.view(-1, num_kv_heads, head_size).index_copy_(0, slot_mapping, v)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    return cache.index_select(0, block_ids).flatten(0, 1)[:length]


def paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: list[int], query_lens: list[int],
                    scale: float) -> torch.Tensor:
    """q: [T, H, D] packed by sequence; returns [T, H, D]."""
    block_size = key_cache.shape[1]
    num_heads, num_kv_heads = q.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    start = 0
    for i, (seq_len, query_len) in enumerate(zip(seq_lens, query_lens)):
        num_blocks = -(-seq_len // block_size)
        blocks = block_tables[i, :num_blocks]
        k = _gather(key_cache, blocks, seq_len).transpose(0, 1)       # [Hkv, S, D]
        v = _gather(value_cache, blocks, seq_len).transpose(0, 1)
        if group > 1:
            k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
        qi = q[start:start + query_len].transpose(0, 1)                 # [H, Q, D]
        mask = None
        if query_len > 1:
            q_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)[:, None]
            mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos
        out[start:start + query_len] = F.scaled_dot_product_attention(
            qi, k, v, attn_mask=mask, scale=scale).transpose(0, 1)
        start += query_len
    return out
