"""Vision embeddings for scheduled chunks: an LRU cache by content hash and batched encoding of misses.

What it is for: `EncoderCache`, embeddings of images / videos keyed by their
content hash, bounded in LLM tokens, shared across requests (the same image in
two requests is encoded once while it stays cached); and `VisionEmbedder`,
which gives each scheduled chunk the slices of the embeddings its placeholder
rows need, encoding what the cache misses in as few encoder calls as
`max_encoder_patches` allows. Apart from the LRU, the embedder holds the
embeddings of a span whose prefill a request has begun and not finished, so a
chunked prefill encodes each visual once even when it does not fit in the
cache (or the cache is off, or other requests evict it between two chunks).
Spans a chunk does not overlap (for example fully prefix-cached ones) are
never encoded.
Not for: the vision tower itself (runtime/vision/vision_encoder.py) or where the
placeholders are (runtime/multimodal/processor.py builds the spans).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from runtime.multimodal.image_processing import ProcessedVisual
    from runtime.multimodal.processor import MultimodalInputs
    from runtime.core.request import MultimodalSpan
    from runtime.vision.vision_encoder import VisionEncoder


@dataclass(frozen=True, slots=True)
class EncoderCacheStats:
    num_entries: int
    num_tokens: int              # embedding rows held
    max_tokens: int
    num_hits: int
    num_misses: int
    num_encoder_calls: int
    num_encoded_visuals: int


class EncoderCache:
    """LRU map content hash -> [num_tokens, hidden] embeddings, holding at most `max_tokens` rows."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._num_tokens = 0
        self.num_hits = 0
        self.num_misses = 0

    def __contains__(self, content_hash: str) -> bool:
        return content_hash in self._entries

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def num_entries(self) -> int:
        return len(self._entries)

    def get(self, content_hash: str) -> torch.Tensor | None:
        embeds = self._entries.get(content_hash)
        if embeds is None:
            self.num_misses += 1
            return None
        self.num_hits += 1
        self._entries.move_to_end(content_hash)
        return embeds

    def put(self, content_hash: str, embeds: torch.Tensor) -> None:
        """Keep the entry, evicting least recently used ones; an entry above max_tokens is not kept."""
        size = int(embeds.shape[0])
        if size > self.max_tokens or content_hash in self._entries:
            return
        while self._num_tokens + size > self.max_tokens:
            _, evicted = self._entries.popitem(last=False)
            self._num_tokens -= int(evicted.shape[0])
        self._entries[content_hash] = embeds
        self._num_tokens += size


@dataclass(frozen=True, slots=True)
class ChunkRange:
    """Tokens [start, end) of a request with these multimodal inputs are computed this step."""

    request_id: str
    inputs: MultimodalInputs
    start: int
    end: int


class VisionEmbedder:
    """Per step: the (row within chunk, embeddings) pieces of every chunk, encoding cache misses in batches."""

    def __init__(self, encoder: VisionEncoder, cache: EncoderCache, max_encoder_patches: int) -> None:
        self.encoder = encoder
        self.cache = cache
        self.max_encoder_patches = max_encoder_patches
        self.num_encoder_calls = 0
        self.num_encoded_visuals = 0
        # Embeddings some request still needs for a later chunk of its prefill, and who needs them.
        self._held: dict[str, torch.Tensor] = {}
        self._holders: dict[str, set[str]] = {}         # content hash -> request ids
        self._held_by: dict[str, set[str]] = {}         # request id -> content hashes

    def stats(self) -> EncoderCacheStats:
        cache = self.cache
        return EncoderCacheStats(cache.num_entries, cache.num_tokens, cache.max_tokens, cache.num_hits,
                                 cache.num_misses, self.num_encoder_calls, self.num_encoded_visuals)

    @property
    def num_held(self) -> int:
        """Visuals held for unfinished prefills (outside the LRU)."""
        return len(self._held)

    def embeds_for(self, chunks: list[ChunkRange | None]) -> list[tuple[tuple[int, torch.Tensor], ...]]:
        """For each chunk (None: text only), the embedding slices of the spans it overlaps.

        A request keeps the embeddings of a visual until a chunk reaches the end of its last span
        with that content, or until `release` (finished, aborted or preempted).
        """
        needed: dict[str, ProcessedVisual] = {}
        for chunk in chunks:
            if chunk is not None:
                for visual, _ in _overlapping(chunk):
                    needed.setdefault(visual.content_hash, visual)
        found = self._lookup_or_encode(list(needed.values()))
        pieces = [self._pieces(chunk, found) if chunk is not None else () for chunk in chunks]
        for chunk in chunks:
            if chunk is not None:
                self._hold_unfinished(chunk, found)
        return pieces

    def release(self, request_ids: list[str]) -> None:
        """Drop what these requests hold (finished, aborted, or preempted: they start again from token 0)."""
        for request_id in request_ids:
            for content_hash in self._held_by.pop(request_id, ()):
                self._unhold(request_id, content_hash)

    def _hold_unfinished(self, chunk: ChunkRange, found: dict[str, torch.Tensor]) -> None:
        last_end: dict[str, int] = {}
        for visual, span in zip(chunk.inputs.visuals, chunk.inputs.spans):
            last_end[visual.content_hash] = max(last_end.get(visual.content_hash, 0), span.offset + span.length)
        held = self._held_by.pop(chunk.request_id, set())
        for visual, _ in _overlapping(chunk):
            content_hash = visual.content_hash
            if chunk.end < last_end[content_hash]:
                held.add(content_hash)
                self._holders.setdefault(content_hash, set()).add(chunk.request_id)
                self._held.setdefault(content_hash, found[content_hash])
            elif content_hash in held:
                held.discard(content_hash)
                self._unhold(chunk.request_id, content_hash)
        if held:
            self._held_by[chunk.request_id] = held

    def _unhold(self, request_id: str, content_hash: str) -> None:
        holders = self._holders[content_hash]
        holders.discard(request_id)
        if not holders:
            del self._holders[content_hash]
            del self._held[content_hash]

    def _lookup_or_encode(self, visuals: list[ProcessedVisual]) -> dict[str, torch.Tensor]:
        found: dict[str, torch.Tensor] = {}
        missing: list[ProcessedVisual] = []
        for visual in visuals:
            # The LRU first (its hit / miss counts are the cache's), then what unfinished prefills hold.
            embeds = self.cache.get(visual.content_hash)
            if embeds is None:
                embeds = self._held.get(visual.content_hash)
            if embeds is None:
                missing.append(visual)
            else:
                found[visual.content_hash] = embeds
        for batch in self._batches(missing):
            for visual, embeds in zip(batch, self._encode(batch)):
                found[visual.content_hash] = embeds
                self.cache.put(visual.content_hash, embeds)
        return found

    @staticmethod
    def _pieces(chunk: ChunkRange, found: dict[str, torch.Tensor]) -> tuple[tuple[int, torch.Tensor], ...]:
        """(row within the chunk, rows of the embeddings) for each span part inside [start, end)."""
        pieces = []
        for visual, span in _overlapping(chunk):
            lo, hi = max(chunk.start, span.offset), min(chunk.end, span.offset + span.length)
            pieces.append((lo - chunk.start, found[visual.content_hash][lo - span.offset:hi - span.offset]))
        return tuple(pieces)

    def _batches(self, visuals: list[ProcessedVisual]) -> list[list[ProcessedVisual]]:
        """Consecutive groups within the patch budget (a visual above the budget goes alone)."""
        batches: list[list[ProcessedVisual]] = []
        num_patches = 0
        for visual in visuals:
            size = visual.num_patches
            if batches and num_patches + size <= self.max_encoder_patches:
                batches[-1].append(visual)
                num_patches += size
            else:
                batches.append([visual])
                num_patches = size
        return batches

    def _encode(self, batch: list[ProcessedVisual]) -> list[torch.Tensor]:
        # one visual (most calls at moderate load): its rows as they are, without concatenate's copy of them
        rows = batch[0].pixel_values if len(batch) == 1 else np.concatenate([v.pixel_values for v in batch], axis=0)
        pixels = torch.from_numpy(rows)
        embeds = self.encoder.encode(pixels, [v.grid_thw for v in batch])
        sizes = [v.num_tokens for v in batch]
        if embeds.shape[0] != sum(sizes):
            raise RuntimeError(f"vision encoder returned {embeds.shape[0]} rows for {sum(sizes)} tokens")
        self.num_encoder_calls += 1
        self.num_encoded_visuals += len(batch)
        return list(embeds.split(sizes))


def _overlapping(chunk: ChunkRange) -> Iterator[tuple[ProcessedVisual, MultimodalSpan]]:
    for visual, span in zip(chunk.inputs.visuals, chunk.inputs.spans):
        if span.offset < chunk.end and span.offset + span.length > chunk.start:
            yield visual, span
