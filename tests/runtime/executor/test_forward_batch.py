"""ForwardBatch.build: the numpy packing into reused host buffers against a per-token Python packing.

Mixed batches (a prompt across blocks with holes in its table, a chunk after a prefix, decode rows,
an M-RoPE delta) packed into one HostBuffers several times (it grows when a batch needs more rows) give
exactly the token ids, positions, slots, tables, lengths and logits rows computed here token by token.
ForwardBatch.build_decode (a decode-only step as columns) gives the batch `build` makes of the same
one-token chunks, placeholders and rows without logits included.
"""
from __future__ import annotations

import random

import pytest
import torch

from runtime.executor.forward_batch import DecodeRows, ForwardBatch, HostBuffers, SequenceChunk

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


def test_decode_rows_pack_like_one_token_chunks() -> None:
    rng = random.Random(0)
    for num_rows in (1, 3, 16):
        starts = [rng.randrange(40) for _ in range(num_rows)]
        # ragged tables: each row holds its position's block and sometimes more, in a random order
        block_ids = [rng.sample(range(100), start // BLOCK + 1 + rng.randrange(2)) for start in starts]
        token_ids = [rng.randrange(1000) for _ in range(num_rows)]
        logits = sorted(rng.sample(range(num_rows), max(1, num_rows - 2)))
        placeholder_rows = sorted(rng.sample(range(num_rows), num_rows // 2))
        sources = [rng.randrange(num_rows) for _ in placeholder_rows]
        chunks = [SequenceChunk([token_ids[i]], starts[i], block_ids[i], i in logits, None, (), 0,
                                sources[placeholder_rows.index(i)] if i in placeholder_rows else -1)
                  for i in range(num_rows)]
        want = ForwardBatch.build(chunks, BLOCK, CPU, split_context=64)
        rows = DecodeRows(token_ids, starts, block_ids, None if len(logits) == num_rows else logits,
                          placeholder_rows, sources)
        got = ForwardBatch.build_decode(rows, BLOCK, CPU, split_context=64)
        for name in ("token_ids", "positions", "slot_mapping", "block_tables", "logits_indices"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        for name in ("seq_lens_tensor", "query_start_loc", "block_tables"):
            assert torch.equal(getattr(got.attention, name), getattr(want.attention, name)), name
            assert getattr(got.attention, name).dtype == getattr(want.attention, name).dtype, name
        assert (got.seq_lens, got.query_lens) == (want.seq_lens, want.query_lens)
        assert (got.attention.seq_lens, got.attention.query_lens) == (want.attention.seq_lens, want.attention.query_lens)
        assert (got.attention.max_query_len, got.attention.split_context) == (1, 64)
        if placeholder_rows:
            assert torch.equal(got.placeholder_rows, want.placeholder_rows)
            assert torch.equal(got.placeholder_sources, want.placeholder_sources)
        else:
            assert got.placeholder_rows is None and want.placeholder_rows is None


def test_decode_row_past_its_blocks_is_refused() -> None:
    with pytest.raises(ValueError, match=r"rows\[1\]: 9 tokens do not fit in 2 blocks"):
        ForwardBatch.build_decode(DecodeRows([1, 2], [3, 8], [[0], [1, 2]]), BLOCK, CPU)
