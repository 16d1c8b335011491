"""The attention block's fused op, defined by composition: split the qkv rows, RoPE, KV write, attention.

What it is for: the semantics of the op set's `qkv_attention` (plugins/registry.py), the part of
a decoder layer between its qkv projection and its output projection. `UnfusedQKVAttention` runs it
through any op set's unfused ops (the reference set's, Triton's, the CPU set's fallback), so a fused
kernel (plugins/cpu/paged_attention.py) is tested against this composition of the reference ops.
Not for: the one-byte KV cache (runtime/executor/kv_quant.py keeps its own write and attention).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from plugins.attention_metadata import AttentionMetadata
from plugins.reference import paged_attention, rope


@dataclass(frozen=True, slots=True)
class UnfusedQKVAttention:
    """(qkv [T, (H + 2 Hkv) D], cos [T, D], sin [T, D], key_cache, value_cache [blocks, block_size, Hkv, D],
    slot_mapping [T], AttentionMetadata, scale) -> [T, H D]: q and k rotated, k and v written at their
    slots (slot -1: skipped where the write op skips it), then paged causal attention of q over the cache."""

    apply_rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    write_kv_cache: Callable[..., None]
    paged_attention_meta: Callable[..., torch.Tensor]

    def __call__(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_cache: torch.Tensor,
                 value_cache: torch.Tensor, slot_mapping: torch.Tensor, metadata: AttentionMetadata,
                 scale: float) -> torch.Tensor:
        num_kv_heads, head_size = key_cache.shape[-2], key_cache.shape[-1]
        kv_size = num_kv_heads * head_size
        q_size = qkv.shape[-1] - 2 * kv_size
        q, k, v = qkv.split_with_sizes([q_size, kv_size, kv_size], dim=-1)
        q, k = self.apply_rope(q.view(-1, q_size // head_size, head_size), k.view(-1, num_kv_heads, head_size),
                               cos, sin)
        self.write_kv_cache(key_cache, value_cache, k, v.view(-1, num_kv_heads, head_size), slot_mapping)
        return self.paged_attention_meta(q, key_cache, value_cache, metadata, scale).reshape(-1, q_size)


def reference_attention_meta(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                             metadata: AttentionMetadata, scale: float) -> torch.Tensor:
    """The reference attention op with the op set's `paged_attention_meta` signature (it reads the host lists)."""
    return paged_attention.paged_attention(q, key_cache, value_cache, metadata.block_tables, metadata.seq_lens,
                                           metadata.query_lens, scale)


REFERENCE_QKV_ATTENTION = UnfusedQKVAttention(rope.apply_rope, paged_attention.write_kv_cache,
                                              reference_attention_meta)
