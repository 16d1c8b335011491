"""The Triton paged-attention op: decode-only batches to the split-K decode kernel, the rest to prefill.

What it is for: the two entry points the op set exposes, one taking the step's
AttentionMetadata (device tensors, CUDA-graph safe) and one taking host lists
with the reference op's signature (it uploads them, for callers that only hold lists).
Not for: the kernels (attention_decode.py, attention_prefill.py).
"""
from __future__ import annotations

import torch

from plugins.attention_metadata import AttentionMetadata
from plugins.triton.attention_decode import paged_attention_decode
from plugins.triton.attention_prefill import paged_attention_prefill


def paged_attention_meta(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         metadata: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, D] packed by sequence; reads only the metadata's device tensors and static shapes."""
    if metadata.decode_only and q.shape[0] == metadata.num_seqs:
        return paged_attention_decode(q, key_cache, value_cache, metadata.block_tables, metadata.seq_lens_tensor,
                                      scale, max_context=metadata.split_context or None)
    return paged_attention_prefill(q, key_cache, value_cache, metadata.block_tables, metadata.seq_lens_tensor,
                                   metadata.query_start_loc, metadata.max_query_len, scale)


def paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: list[int], query_lens: list[int], scale: float) -> torch.Tensor:
    """The reference op's signature: builds the metadata (one upload), then paged_attention_meta."""
    metadata = AttentionMetadata.build(block_tables, seq_lens, query_lens, q.device)
    return paged_attention_meta(q, key_cache, value_cache, metadata, scale)
