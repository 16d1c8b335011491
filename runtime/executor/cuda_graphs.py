"""Decode steps replayed from CUDA graphs captured at start-up, one per batch size of a ladder.

What it is for: removing the per-kernel launch cost of a decode step (hundreds of
small launches per token on a 24-layer model). At start-up the runner captures the
model's forward for batch sizes 1, 2, 4, 8, 16, 24, ... up to a maximum, all reading
static input buffers and sharing one memory pool; a decode-only step of n sequences
copies its inputs into the buffers, pads to the next captured size (padding rows
write no KV slot and attend to nothing) and replays. Steps that compute more than
one token of some sequence (prefill, chunked prefill, mixed), carry M-RoPE rows or
vision embeddings, or exceed the largest size run eagerly.
With `capture=False` the same padded static-buffer path runs eagerly (CPU tests of
the padding rules; the GPU suite compares real graphs with eager steps).
Not for: sampling (it stays eager, on the logits this returns) or choosing the ops
(the op set must be graph-safe: plugins/registry.py).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from plugins.attention_metadata import AttentionMetadata
from runtime.executor.forward_batch import ForwardBatch
from runtime.executor.kv_storage import KVStorage
from runtime.executor.model import DecoderModel

LOG = logging.getLogger(__name__)


def batch_size_ladder(max_size: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every multiple of 16 up to max_size (and max_size itself)."""
    if max_size < 1:
        raise ValueError(f"max_size: must be >= 1, got {max_size}")
    sizes = {s for s in (1, 2, 4, 8) if s <= max_size} | set(range(16, max_size + 1, 16)) | {max_size}
    return tuple(sorted(sizes))


@dataclass(slots=True)
class _StaticInputs:
    """The buffers every captured graph reads; graph n reads their first n rows."""

    token_ids: torch.Tensor        # [N] int64
    positions: torch.Tensor        # [N] int64
    slot_mapping: torch.Tensor     # [N] int64, -1 on padding rows
    block_tables: torch.Tensor     # [N, max_blocks] int64
    seq_lens: torch.Tensor         # [N] int32, 0 on padding rows
    query_start_loc: torch.Tensor  # [N + 1] int32, 0..N (one token per sequence)
    logits_indices: torch.Tensor   # [N] int64, 0..N-1
    split_context: int             # max_blocks * block_size: eager decode steps split the same way

    @classmethod
    def allocate(cls, size: int, max_blocks: int, block_size: int, device: torch.device) -> _StaticInputs:
        def zeros(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(zeros(size), zeros(size), torch.full((size,), -1, dtype=torch.int64, device=device),
                   zeros(size, max_blocks), zeros(size, dtype=torch.int32),
                   torch.arange(size + 1, dtype=torch.int32, device=device),
                   torch.arange(size, dtype=torch.int64, device=device), max_blocks * block_size)

    def batch(self, size: int) -> ForwardBatch:
        """A decode ForwardBatch of `size` rows whose tensors are views of the buffers."""
        attention = AttentionMetadata(self.block_tables[:size], self.seq_lens[:size],
                                      self.query_start_loc[:size + 1], [0] * size, [1] * size, 1,
                                      self.split_context)
        return ForwardBatch(token_ids=self.token_ids[:size], positions=self.positions[:size],
                            slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
                            logits_indices=self.logits_indices[:size], seq_lens=[0] * size, query_lens=[1] * size,
                            attention=attention)

    def load(self, batch: ForwardBatch, size: int) -> None:
        """Copy a decode batch of n <= size rows in; rows n..size-1 become padding."""
        n, width = batch.num_tokens, batch.block_tables.shape[1]
        self.token_ids[:n].copy_(batch.token_ids, non_blocking=True)
        self.positions[:n].copy_(batch.positions, non_blocking=True)
        self.slot_mapping[:n].copy_(batch.slot_mapping, non_blocking=True)
        self.block_tables[:n, :width].copy_(batch.block_tables, non_blocking=True)
        self.seq_lens[:n].copy_(batch.attention.seq_lens_tensor, non_blocking=True)
        if size > n:
            self.slot_mapping[n:size].fill_(-1)
            self.seq_lens[n:size].zero_()


class CudaGraphRunner:
    def __init__(self, model: DecoderModel, kv: KVStorage, max_batch_size: int, max_blocks_per_seq: int,
                 capture: bool = True) -> None:
        if not model.ops.graph_safe:
            raise ValueError(f"op backend {model.ops.name!r} is not graph-safe (decode must read device tensors)")
        self.batch_sizes = batch_size_ladder(max_batch_size)
        self.max_blocks_per_seq = max_blocks_per_seq
        self._inputs = _StaticInputs.allocate(self.batch_sizes[-1], max_blocks_per_seq, kv.block_size, model.device)
        self._steps: dict[int, Callable[[], torch.Tensor]] = {}
        if capture:
            self._capture(model, kv)
        else:
            for size in self.batch_sizes:
                self._steps[size] = _eager_step(model, kv, self._inputs.batch(size))

    def _capture(self, model: DecoderModel, kv: KVStorage) -> None:
        """Largest size first, so the smaller graphs fit in the memory pool the largest one reserved."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(model.device)
        stream.wait_stream(torch.cuda.current_stream(model.device))
        with torch.cuda.stream(stream):
            for size in reversed(self.batch_sizes):
                batch = self._inputs.batch(size)
                model.forward(batch, kv)               # warm-up: Triton compiles, the allocator settles
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    logits = model.forward(batch, kv)
                self._steps[size] = _replay_step(graph, logits)
        torch.cuda.current_stream(model.device).wait_stream(stream)
        torch.cuda.synchronize(model.device)
        LOG.info("CUDA graphs: captured decode batch sizes %s", list(self.batch_sizes))

    def can_run(self, batch: ForwardBatch) -> bool:
        """Decode-only, 1-D positions, no vision rows, within the largest captured size and table width."""
        return (batch.attention.decode_only and batch.num_tokens == batch.attention.num_seqs
                and batch.num_tokens <= self.batch_sizes[-1] and batch.positions.dim() == 1
                and batch.embed_rows is None and batch.block_tables.shape[1] <= self.max_blocks_per_seq)

    def padded_size(self, num_seqs: int) -> int:
        return next(size for size in self.batch_sizes if size >= num_seqs)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Float32 logits [len(batch.logits_indices), vocab] for a batch that `can_run`."""
        size = self.padded_size(batch.num_tokens)
        self._inputs.load(batch, size)
        logits = self._steps[size]()
        return logits.index_select(0, batch.logits_indices)


def _replay_step(graph: torch.cuda.CUDAGraph, logits: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        graph.replay()
        return logits
    return step


def _eager_step(model: DecoderModel, kv: KVStorage, batch: ForwardBatch) -> Callable[[], torch.Tensor]:
    return lambda: model.forward(batch, kv)
