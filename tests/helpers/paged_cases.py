"""Random paged-attention cases shared by the Triton kernel tests (CPU interpreter) and tests/gpu.

A case: ragged sequences whose keys / values sit in a paged cache at blocks drawn
from a shuffled pool (holes between them), table rows padded with a block that was
never written, and every slot not written holding NaN, so a kernel that reads
anything outside a sequence's own tokens produces NaN. `reference_cache()` gives the
same cache with zeros instead of NaN for the reference op (which gathers whole blocks
and masks afterwards).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from plugins.attention_metadata import AttentionMetadata


@dataclass(frozen=True, slots=True)
class PagedCase:
    q: torch.Tensor                 # [T, H, D] packed by sequence
    key_cache: torch.Tensor         # [num_blocks, block_size, Hkv, D], NaN where nothing was written
    value_cache: torch.Tensor
    block_tables: torch.Tensor      # [B, max_blocks] int64
    seq_lens: list[int]
    query_lens: list[int]
    scale: float

    def metadata(self) -> AttentionMetadata:
        return AttentionMetadata.build(self.block_tables, self.seq_lens, self.query_lens, self.q.device)

    def reference_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key_cache.nan_to_num(0.0), self.value_cache.nan_to_num(0.0)


def make_case(seq_lens: list[int], query_lens: list[int], num_kv_heads: int, group: int, head_size: int,
              block_size: int, dtype: torch.dtype, device: str, seed: int = 0, extra_blocks: int = 3) -> PagedCase:
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + len(seq_lens) + extra_blocks + 1   # room for holes, +1: the pad block
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    pad_block, pool = pool[0], pool[1:]
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.full(shape, float("nan"), dtype=dtype)
    value_cache = torch.full(shape, float("nan"), dtype=dtype)
    width = max(blocks_per_seq) + 1
    tables = torch.full((len(seq_lens), width), pad_block, dtype=torch.int64)
    cursor = 0
    for i, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        cursor += int(torch.randint(0, 2, (1,), generator=gen))      # skip a block now and then: holes
        ids = pool[cursor:cursor + nb]
        cursor += nb
        tables[i, :nb] = torch.tensor(ids)
        positions = torch.arange(n)
        slots = torch.tensor(ids)[positions // block_size] * block_size + positions % block_size
        key_cache.view(-1, num_kv_heads, head_size)[slots] = torch.randn(n, num_kv_heads, head_size,
                                                                        generator=gen).to(dtype)
        value_cache.view(-1, num_kv_heads, head_size)[slots] = torch.randn(n, num_kv_heads, head_size,
                                                                          generator=gen).to(dtype)
    q = torch.randn(sum(query_lens), num_kv_heads * group, head_size, generator=gen).to(dtype)
    return PagedCase(q.to(device), key_cache.to(device), value_cache.to(device), tables.to(device),
                     list(seq_lens), list(query_lens), head_size ** -0.5)
