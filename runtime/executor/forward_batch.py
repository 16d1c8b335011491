"""The model-side batch: scheduled token chunks packed into flat tensors.

What it is for: the one place where plain-Python scheduling decisions (which
tokens of which sequence, in which KV blocks) become tensors for the executor:
token ids, positions (1-D, or [3, T] M-RoPE positions when a chunk carries
them), slot mapping, block tables, sequence / query lengths, which positions need logits, and the rows
whose token embedding is replaced by a vision embedding, packed with numpy into preallocated host arrays
(`HostBuffers`) rather than Python lists per token; a decode-only step (`DecodeRows`: columns rather than
chunks) is packed into one array per step (`ForwardBatch.build_decode`). On CUDA the host tensors go up
through pinned memory without blocking the host. With overlap (runtime/core/overlap.py) a decode row's
input token may be a placeholder: the previous step sampled it and it is not on the host yet;
`fill_placeholders` writes it from that step's sampled-token tensor, on the device, just before the forward.
Not for: deciding what to run (runtime/core/scheduler.py) or running it (runtime/executor/model.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from plugins.attention_metadata import AttentionMetadata, to_device


@dataclass(frozen=True, slots=True)
class SequenceChunk:
    """Tokens [start, start + len(token_ids)) of one sequence, computed this step."""

    token_ids: list[int]
    start: int
    block_ids: list[int]
    needs_logits: bool = True
    # [3, len(token_ids)] M-RoPE positions; None: every axis is the 1-D position p + position_delta
    mrope_positions: np.ndarray | None = None
    # (row within the chunk, [n, hidden] embeddings) replacing the token embeddings of rows [row, row + n)
    embeds: tuple[tuple[int, torch.Tensor], ...] = ()
    position_delta: int = 0     # M-RoPE decode delta of a multimodal request past its prompt
    # >= 0: the chunk's last token is a placeholder for row `placeholder_source` of the previous step's
    # sampled tokens (its value in token_ids is ignored)
    placeholder_source: int = -1


@dataclass(slots=True)
class DecodeRows:
    """A decode-only step as columns: row i computes the token at position starts[i] of its sequence, one
    token per sequence, 1-D positions, no embeddings replaced (the shape of most steps)."""

    token_ids: list[int]              # a placeholder row's entry is ignored
    starts: list[int]
    block_ids: list[list[int]]
    logits_rows: list[int] | None = None        # rows that need logits; None: every row
    placeholder_rows: list[int] = field(default_factory=list)       # see SequenceChunk.placeholder_source
    placeholder_sources: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ForwardBatch:
    token_ids: torch.Tensor       # [T] int64
    positions: torch.Tensor       # [T] int64, or [3, T] when some chunk has M-RoPE positions
    slot_mapping: torch.Tensor    # [T] int64
    block_tables: torch.Tensor    # [B, max_blocks] int64
    logits_indices: torch.Tensor  # [num_logits] int64, indices into T
    seq_lens: list[int]           # per sequence: tokens in the cache after this step
    query_lens: list[int]         # per sequence: tokens computed this step
    attention: AttentionMetadata  # the same lengths and block tables as device tensors, for the attention op
    embed_rows: torch.Tensor | None = None   # [R] int64 indices into T whose embedding is replaced
    embeds: torch.Tensor | None = None       # [R, hidden] float32, the replacements in embed_rows order
    placeholder_rows: torch.Tensor | None = None      # [P] int64 indices into T whose token is a placeholder
    placeholder_sources: torch.Tensor | None = None   # [P] int64 rows of the previous step's sampled tokens

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def fill_placeholders(self, previous_token_ids: torch.Tensor | None) -> None:
        """Write the previous step's sampled tokens ([num sampling rows] int64, on the batch's device) into
        the placeholder rows, in place; None (that step failed): they stay as built, and the rows' requests
        have been failed, so their outputs are dropped."""
        if self.placeholder_rows is None or previous_token_ids is None:
            return
        self.token_ids.index_copy_(0, self.placeholder_rows,
                                   previous_token_ids.index_select(0, self.placeholder_sources))

    @classmethod
    def build(cls, chunks: list[SequenceChunk], block_size: int, device: torch.device,
              split_context: int = 0, buffers: HostBuffers | None = None) -> ForwardBatch:
        """Pack chunks; positions are [3, T] only if some chunk has M-RoPE positions (the others then
        repeat their 1-D positions on every axis), else 1-D. `split_context`: AttentionMetadata's.
        `buffers`: the executor's preallocated host arrays (reused: on CPU the batch's tensors are views
        of them, valid until the next build with the same buffers); None allocates fresh ones."""
        if not chunks:
            raise ValueError("chunks: a forward batch needs at least one sequence")
        num_tokens = sum(len(c.token_ids) for c in chunks)
        host = buffers if buffers is not None else HostBuffers(num_tokens)
        token_ids, positions, slots = host.rows(num_tokens)
        mrope_rows: list[tuple[int, np.ndarray]] = []     # (first row in T, [3, n] positions)
        embed_rows: list[int] = []
        embeds: list[torch.Tensor] = []
        placeholder_rows: list[int] = []
        placeholder_sources: list[int] = []
        logits_indices: list[int] = []
        seq_lens: list[int] = []
        query_lens: list[int] = []
        max_blocks = max(len(c.block_ids) for c in chunks)
        table = np.zeros((len(chunks), max_blocks), dtype=np.int64)
        cursor = 0
        for i, chunk in enumerate(chunks):
            n = len(chunk.token_ids)
            start, end = chunk.start, chunk.start + n
            if n == 0 or end > len(chunk.block_ids) * block_size:
                raise ValueError(f"chunks[{i}]: {end} tokens do not fit in {len(chunk.block_ids)} blocks")
            if chunk.mrope_positions is not None:
                if chunk.mrope_positions.shape != (3, n):
                    raise ValueError(f"chunks[{i}]: mrope_positions {chunk.mrope_positions.shape} is not (3, {n})")
                mrope_rows.append((cursor, chunk.mrope_positions))
            for row, rows in chunk.embeds:
                if row < 0 or row + rows.shape[0] > n:
                    raise ValueError(f"chunks[{i}]: embeddings for rows [{row}, {row + rows.shape[0]}) "
                                     f"outside the chunk's {n} tokens")
                embed_rows.extend(range(cursor + row, cursor + row + rows.shape[0]))
                embeds.append(rows)
            table[i, :len(chunk.block_ids)] = chunk.block_ids
            if n == 1:          # decode: scalars, no temporary arrays
                token_ids[cursor] = chunk.token_ids[0]
                positions[cursor] = start + chunk.position_delta
                slots[cursor] = chunk.block_ids[start // block_size] * block_size + start % block_size
            else:
                token_ids[cursor:cursor + n] = chunk.token_ids
                where = np.arange(start, end, dtype=np.int64)
                positions[cursor:cursor + n] = where + chunk.position_delta
                slots[cursor:cursor + n] = table[i, where // block_size] * block_size + where % block_size
            cursor += n
            if chunk.placeholder_source >= 0:
                placeholder_rows.append(cursor - 1)
                placeholder_sources.append(chunk.placeholder_source)
            if chunk.needs_logits:
                logits_indices.append(cursor - 1)
            seq_lens.append(end)
            query_lens.append(n)

        def as_tensor(values: np.ndarray | list[int]) -> torch.Tensor:
            return _as_tensor(values, device)

        attention = AttentionMetadata.build(torch.from_numpy(table), seq_lens, query_lens, device, split_context)
        return cls(as_tensor(token_ids), to_device(_positions(positions, mrope_rows), device), as_tensor(slots),
                   attention.block_tables, as_tensor(logits_indices), seq_lens, query_lens, attention,
                   as_tensor(embed_rows) if embeds else None,
                   torch.cat([e.to(device) for e in embeds]) if embeds else None,
                   as_tensor(placeholder_rows) if placeholder_rows else None,
                   as_tensor(placeholder_sources) if placeholder_rows else None)

    @classmethod
    def build_decode(cls, rows: DecodeRows, block_size: int, device: torch.device,
                     split_context: int = 0) -> ForwardBatch:
        """Pack a decode-only step: the batch `build` makes of the same one-token chunks, with a few numpy
        calls for the whole step (for a batch of tens of rows each numpy or torch call costs about as
        much as a row of scalar Python, so the rows' scalars go into one flat list and one array)."""
        num_rows = len(rows.starts)
        if not num_rows or len(rows.token_ids) != num_rows or len(rows.block_ids) != num_rows:
            raise ValueError(f"rows: {len(rows.token_ids)} token ids, {num_rows} starts and {len(rows.block_ids)} "
                             "block tables; a decode batch needs one of each per row, at least one row")
        width = max(map(len, rows.block_ids))
        slots: list[int] = []
        table: list[int] = []
        padding = [0] * width
        for i, (ids, start) in enumerate(zip(rows.block_ids, rows.starts)):
            block = start // block_size
            if block >= len(ids):
                raise ValueError(f"rows[{i}]: {start + 1} tokens do not fit in {len(ids)} blocks")
            slots.append(ids[block] * block_size + start % block_size)
            table += ids
            if len(ids) < width:
                table += padding[len(ids):]
        logits_rows = list(range(num_rows)) if rows.logits_rows is None else rows.logits_rows
        num_logits = len(logits_rows)
        # one int64 array: token ids, positions, slots, logits rows, then the [B, width] block table
        host = np.array(rows.token_ids + rows.starts + slots + logits_rows + table, dtype=np.int64)
        token_ids, positions, slot_mapping, logits_indices, block_tables = _tensors(
            device, host[:num_rows], host[num_rows:2 * num_rows], host[2 * num_rows:3 * num_rows],
            host[3 * num_rows:3 * num_rows + num_logits],
            host[3 * num_rows + num_logits:].reshape(num_rows, width))
        seq_lens = [start + 1 for start in rows.starts]
        attention = AttentionMetadata.build_decode(block_tables, seq_lens, device, split_context)
        placeholder_rows = placeholder_sources = None
        if rows.placeholder_rows:
            placeholder_rows, placeholder_sources = _tensors(
                device, np.array(rows.placeholder_rows, dtype=np.int64),
                np.array(rows.placeholder_sources, dtype=np.int64))
        return cls(token_ids, positions, slot_mapping, attention.block_tables, logits_indices, seq_lens,
                   attention.query_lens, attention, None, None, placeholder_rows, placeholder_sources)


class HostBuffers:
    """Host arrays a step's token ids, positions and slots are packed into, allocated once and reused
    (grown when a batch needs more rows); the executor holds one, sized for max_num_tokens."""

    def __init__(self, num_tokens: int) -> None:
        self._data = np.empty((3, max(num_tokens, 1)), dtype=np.int64)

    def rows(self, num_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token_ids, positions, slots) views of `num_tokens` entries each."""
        if num_tokens > self._data.shape[1]:
            self._data = np.empty((3, num_tokens), dtype=np.int64)
        return self._data[0, :num_tokens], self._data[1, :num_tokens], self._data[2, :num_tokens]


def _as_tensor(values: np.ndarray | list[int], device: torch.device) -> torch.Tensor:
    """int64 host values on `device` (numpy: no per-element Python, unlike torch.tensor of a list)."""
    array = values if isinstance(values, np.ndarray) else np.array(values, dtype=np.int64)
    return to_device(torch.from_numpy(array), device)


def _tensors(device: torch.device, *arrays: np.ndarray) -> tuple[torch.Tensor, ...]:
    """Host arrays as tensors on `device` (on CPU: views of them)."""
    if device.type == "cpu":
        return tuple(torch.from_numpy(array) for array in arrays)
    return tuple(to_device(torch.from_numpy(array), device) for array in arrays)


def _positions(positions: np.ndarray, mrope_rows: list[tuple[int, np.ndarray]]) -> torch.Tensor:
    """[T] positions, or [3, T] with the chunks' M-RoPE rows written over the 1-D ones on every axis."""
    flat = torch.from_numpy(positions)
    if not mrope_rows:
        return flat
    out = flat.expand(3, -1).clone()
    for first, rows in mrope_rows:
        out[:, first:first + rows.shape[1]] = torch.from_numpy(rows)
    return out
