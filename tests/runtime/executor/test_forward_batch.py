"""ForwardBatch.build: the numpy packing into reused host buffers against a per-token Python packing.

Mixed batches (a prompt across blocks with holes in its table, a chunk after a prefix, decode rows,
an M-RoPE delta) packed into one HostBuffers several times (it grows when a batch needs more rows) give
exactly the token ids, positions, slots, tables, lengths and logits rows computed here token by token.
"""
from __future__ import annotations

import torch

from runtime.executor.forward_batch import ForwardBatch, HostBuffers, SequenceChunk

BLOCK = 4
CPU = torch.device("cpu")


def expected(chunks: list[SequenceChunk]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"token_ids": [], "positions": [], "slots": [], "logits": []}
    for chunk in chunks:
        for j, token in enumerate(chunk.token_ids):
            p = chunk.start + j
            out["token_ids"].append(token)
            out["positions"].append(p + chunk.position_delta)
            out["slots"].append(chunk.block_ids[p // BLOCK] * BLOCK + p % BLOCK)
        if chunk.needs_logits:
            out["logits"].append(len(out["token_ids"]) - 1)
    return out


def test_packing_into_reused_buffers_matches_token_by_token() -> None:
    buffers = HostBuffers(2)
    batches = [
        [SequenceChunk(list(range(10, 21)), 0, [7, 2, 9]), SequenceChunk([5], 6, [3, 4]),
         SequenceChunk([6, 7, 8], 5, [0, 11], needs_logits=False), SequenceChunk([9], 0, [1], position_delta=-3)],
        [SequenceChunk([1], 11, [7, 2, 9]), SequenceChunk([2], 7, [3, 4])],
        [SequenceChunk(list(range(30)), 2, list(range(20, 28)))],
    ]
    for chunks in batches:
        batch = ForwardBatch.build(chunks, BLOCK, CPU, buffers=buffers)
        want = expected(chunks)
        assert batch.token_ids.tolist() == want["token_ids"]
        assert batch.positions.tolist() == want["positions"]
        assert batch.slot_mapping.tolist() == want["slots"]
        assert batch.logits_indices.tolist() == want["logits"]
        assert batch.seq_lens == [c.start + len(c.token_ids) for c in chunks]
        assert batch.query_lens == [len(c.token_ids) for c in chunks]
        for row, chunk in zip(batch.block_tables.tolist(), chunks):
            assert row[:len(chunk.block_ids)] == chunk.block_ids
        fresh = ForwardBatch.build(chunks, BLOCK, CPU)
        assert torch.equal(fresh.slot_mapping, batch.slot_mapping) and torch.equal(fresh.positions, batch.positions)
