"""Paged attention reference: KV cache write by slot, causal attention over block tables.

The cache of one layer is two tensors [num_blocks, block_size, num_kv_heads,
head_size]; token slot s lives at block s // block_size, offset s % block_size.
A sequence with `seq_len` known tokens of which the last `query_len` are in
this step attends, for its query j, to cache positions [0, seq_len - query_len + j].
Decode rows (query_len 1) run as one batched call over a padded gather;
prefill chunks run one sequence at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_cache(key_cache: torch.Tensor, value_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    num_kv_heads, head_size = key_cache.shape[-2:]
    key_cache.view(-1, num_kv_heads, head_size).index_copy_(0, slot_mapping, k)
    value_cache.view(-1, num_kv_heads, head_size).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: list[int], query_lens: list[int],
                    scale: float) -> torch.Tensor:
    """q: [T, H, D] packed by sequence; returns [T, H, D]."""
    out = torch.empty_like(q)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    decode = [i for i, n in enumerate(query_lens) if n == 1]
    if decode:
        rows = torch.tensor([starts[i] for i in decode], device=q.device)
        lens = [seq_lens[i] for i in decode]
        tables = block_tables if len(decode) == len(query_lens) else block_tables[torch.tensor(decode)]
        out[rows] = _decode(q.index_select(0, rows), key_cache, value_cache, tables, lens, scale)
    for i, n in enumerate(query_lens):
        if n > 1:
            out[starts[i]:starts[i] + n] = _prefill(q[starts[i]:starts[i] + n], key_cache, value_cache,
                                                    block_tables[i], seq_lens[i], scale)
    return out


def _gather(cache: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
    """[B, num_blocks] block ids -> [B, num_kv_heads, length, head_size]."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    blocks = cache[tables[:, :num_blocks]]                     # [B, nb, bs, Hkv, D]
    return blocks.flatten(1, 2)[:, :length].transpose(1, 2)


def _decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, tables: torch.Tensor,
            seq_lens: list[int], scale: float) -> torch.Tensor:
    max_len = max(seq_lens)
    k, v = _gather(key_cache, tables, max_len), _gather(value_cache, tables, max_len)
    mask = None
    if min(seq_lens) != max_len:
        lens = torch.tensor(seq_lens, device=q.device)
        mask = (torch.arange(max_len, device=q.device)[None, :] < lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out[:, :, 0, :]


def _prefill(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, table: torch.Tensor,
             seq_len: int, scale: float) -> torch.Tensor:
    query_len = q.shape[0]
    k = _gather(key_cache, table[None], seq_len)[0]            # [Hkv, S, D]
    v = _gather(value_cache, table[None], seq_len)[0]
    q_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)[:, None]
    mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[0])
    return out.transpose(0, 1)
