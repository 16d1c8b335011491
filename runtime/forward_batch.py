"""The model-side batch: scheduled token chunks packed into flat tensors.

What it is for: the one place where plain-Python scheduling decisions (which
tokens of which sequence, in which KV blocks) become tensors for the executor:
token ids, positions, slot mapping, block tables, sequence / query lengths,
and which positions need logits.
Not for: deciding what to run (runtime/scheduler.py) or running it (runtime/model.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SequenceChunk:
    """Tokens [start, start + len(token_ids)) of one sequence, computed this step."""

    token_ids: list[int]
    start: int
    block_ids: list[int]
    needs_logits: bool = True


@dataclass(frozen=True, slots=True)
class ForwardBatch:
    token_ids: torch.Tensor       # [T] int64
    positions: torch.Tensor       # [T] int64
    slot_mapping: torch.Tensor    # [T] int64
    block_tables: torch.Tensor    # [B, max_blocks] int64
    logits_indices: torch.Tensor  # [num_logits] int64, indices into T
    seq_lens: list[int]           # per sequence: tokens in the cache after this step
    query_lens: list[int]         # per sequence: tokens computed this step

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @classmethod
    def build(cls, chunks: list[SequenceChunk], block_size: int, device: torch.device) -> "ForwardBatch":
        if not chunks:
            raise ValueError("chunks: a forward batch needs at least one sequence")
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        seq_lens: list[int] = []
        query_lens: list[int] = []
        max_blocks = max(len(c.block_ids) for c in chunks)
        table = torch.zeros((len(chunks), max_blocks), dtype=torch.int64)
        for i, chunk in enumerate(chunks):
            n = len(chunk.token_ids)
            end = chunk.start + n
            if n == 0 or end > len(chunk.block_ids) * block_size:
                raise ValueError(f"chunks[{i}]: {end} tokens do not fit in {len(chunk.block_ids)} blocks")
            token_ids.extend(chunk.token_ids)
            pos = range(chunk.start, end)
            positions.extend(pos)
            slots.extend(chunk.block_ids[p // block_size] * block_size + p % block_size for p in pos)
            if chunk.needs_logits:
                logits_indices.append(len(token_ids) - 1)
            seq_lens.append(end)
            query_lens.append(n)
            table[i, :len(chunk.block_ids)] = torch.tensor(chunk.block_ids, dtype=torch.int64)

        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        return cls(as_tensor(token_ids), as_tensor(positions), as_tensor(slots), table.to(device),
                   as_tensor(logits_indices), seq_lens, query_lens)
