"""Reading a one-byte paged KV cache (int8 / FP8 codes): the blocks a step reads, decoded through a byte table.

What it is for: the reference of the op set's `dequantize_kv_context`. It gathers
the blocks that each sequence of the step reads (ceil(seq_len / block_size) of
its block table) from the one-byte key and value pools and decodes every byte
as `table[byte]`, into compact float pools in sequence order, with the block
tables renumbered into them; the paged-attention op then runs on those pools as
on a float cache. The 256-entry table holds the dequantized value of every
possible byte (runtime/executor/kv_quant.py builds it with the layer's scale,
by the same expression that dequantizes one value), so decoding through it is
exact by construction, for int8 and float8_e4m3fn alike, and costs one gather
instead of a float8 conversion (which is scalar code on CPUs without fp8).
A block shared by two sequences (prefix caching) is decoded once for each.
Not for: choosing codes or scales (runtime/executor/kv_quant.py), attention itself.
"""
from __future__ import annotations

import torch

from plugins.attention_metadata import AttentionMetadata


def context_blocks(metadata: AttentionMetadata, block_size: int) -> list[int]:
    """Blocks each sequence reads this step (its tokens after the step, rounded up to whole blocks)."""
    return [-(-n // block_size) for n in metadata.seq_lens]


def dequantize_kv_context(key_codes: torch.Tensor, value_codes: torch.Tensor, metadata: AttentionMetadata,
                          table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """key/value_codes: [num_blocks, block_size, kv_heads, head_size], one byte each; table: [256].

    Returns keys and values [sum of the sequences' blocks, block_size, kv_heads, head_size] in the table's
    dtype, and block tables [num_seqs, max blocks] (int64) into them (entries past a sequence's blocks: 0)."""
    counts = context_blocks(metadata, key_codes.shape[1])
    tables = torch.zeros(len(counts), max(counts, default=0), dtype=torch.int64, device=key_codes.device)
    ids, first = [], 0
    for i, count in enumerate(counts):
        tables[i, :count] = torch.arange(first, first + count, device=key_codes.device)
        ids.append(metadata.block_tables[i, :count])
        first += count
    block_ids = torch.cat(ids) if ids else metadata.block_tables.new_zeros(0)
    keys = table[key_codes.index_select(0, block_ids).view(torch.uint8).long()]
    values = table[value_codes.index_select(0, block_ids).view(torch.uint8).long()]
    return keys, values, tables
