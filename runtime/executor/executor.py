"""The PyTorch LLM executor: a loaded engine, its KV storage, one forward per step.

What it is for: turning a `SchedulerOutput` into logits for the requests that
sample, on CPU or CUDA, and sizing the KV pool at start-up (`EngineLayout`: from a profiled
warm-up on CUDA, runtime/executor/memory_profile.py and kv_sizing.py). On CUDA, decode-only
steps replay graphs captured at start-up (runtime/executor/cuda_graphs.py); the rest run eagerly.
On a VL engine each chunk also gets its M-RoPE positions (M-RoPE families) and the
vision embeddings of the placeholder rows it computes (runtime/vision/encoder_cache.py),
whatever the family. A step is `prepare` (the batch, on the host: the engine thread) then `run` (the
forward: on the overlap worker thread, runtime/core/overlap.py, where chunks whose input token the previous
step is still sampling get it from that step's sampled-token tensor); `execute` is both.
Not for: choosing tokens (runtime/executor/sampler.py) or which requests run.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from plugins.registry import get_ops
from runtime.config import EngineConfig, EngineLayout
from runtime.vision.encoder_cache import ChunkRange, EncoderCache, EncoderCacheStats, VisionEmbedder
from engine_format.engine_dir import LoadedEngine
from runtime.executor.forward_batch import DecodeRows, ForwardBatch, HostBuffers, SequenceChunk
from runtime.executor.cuda_graphs import CudaGraphRunner
from runtime.executor.kv_sizing import layout_report, size_kv_pool
from runtime.executor.memory_profile import profile_gpu_memory
from runtime.executor.kv_storage import KVStorage, bytes_per_block
from runtime.executor.model import DecoderModel
from runtime.multimodal.mrope import positions_for_range
from runtime.core.scheduler import ScheduledRequest, SchedulerOutput
from runtime.vision.vision_encoder import load_vision_encoder

LOG = logging.getLogger(__name__)


class PyTorchExecutor:
    def __init__(self, engine: LoadedEngine, config: EngineConfig) -> None:
        device = config.torch_device()
        self.model = DecoderModel(engine.llm_config, engine.weights, device, get_ops(device, config.op_backend))
        block_size = engine.build.tokens_per_block
        per_block = bytes_per_block(engine.llm_config, block_size, self.model.dtype)
        encoder = load_vision_encoder(engine, config.vision_backend, device) if engine.vision is not None else None
        gpu = None
        if device.type == "cuda" and config.num_kv_blocks is None:
            gpu = profile_gpu_memory(self.model, encoder, engine, config, device)
        pool = size_kv_pool(config, _wanted_blocks(engine, config), per_block, gpu)
        self.kv = KVStorage(engine.llm_config, pool.num_blocks, block_size, self.model.dtype, device)
        max_blocks = -(-engine.build.max_seq_len // block_size)
        self.split_context = max_blocks * block_size     # decode split-K plans for this, eager and graphs alike
        num_tokens = config.max_num_tokens or engine.build.max_num_tokens
        # reused each step, two in turn: a step in flight keeps its buffers while the next one is built
        self.host_buffers = (HostBuffers(num_tokens), HostBuffers(num_tokens))
        self._num_prepared = 0
        self.graphs: CudaGraphRunner | None = None
        if _use_cuda_graphs(engine, config, device, self.model):
            graph_batch = min(config.max_cuda_graph_batch_size, config.max_batch_size or engine.build.max_batch_size)
            self.graphs = CudaGraphRunner(self.model, self.kv, graph_batch, max_blocks)
        self.layout = EngineLayout(device, pool.num_blocks, block_size, per_block, pool.description,
                                   gpu.peak_bytes if gpu is not None else None,
                                   self.graphs.batch_sizes if self.graphs is not None else ())
        LOG.info(layout_report(self.layout))
        self.vision: VisionEmbedder | None = None
        if encoder is not None:
            self.vision = VisionEmbedder(encoder, EncoderCache(config.encoder_cache_tokens),
                                         config.max_encoder_patches)

    def execute(self, output: SchedulerOutput) -> torch.Tensor:
        """Logits [number of sampling requests, vocab], rows in scheduling order."""
        return self.run(self.prepare(output))

    def prepare(self, output: SchedulerOutput, placeholder_sources: Mapping[str, int] | None = None) -> ForwardBatch:
        """The step's batch (vision embeddings included). `placeholder_sources`: request id -> row of the
        previous step's sampled tokens, for each chunk with a placeholder token. The batch stays valid until
        the second `prepare` after this one (on CPU its tensors are views of reused host buffers)."""
        scheduled = output.scheduled
        sources = placeholder_sources or {}
        block_size, device = self.layout.tokens_per_block, self.layout.device
        rows = _decode_rows(scheduled, sources) if self.vision is None else None
        if rows is not None:        # a decode-only text step: fresh arrays, no host buffers
            return ForwardBatch.build_decode(rows, block_size, device, self.split_context)
        embeds = self._vision_embeds(output)
        chunks = [_sequence_chunk(s, e, sources) for s, e in zip(scheduled, embeds)]
        buffers = self.host_buffers[self._num_prepared % 2]
        self._num_prepared += 1
        return ForwardBatch.build(chunks, block_size, device, self.split_context, buffers)

    def run(self, batch: ForwardBatch, previous_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of a prepared batch; `previous_token_ids` (the previous step's sampled tokens, on this
        device) fill its placeholder rows first."""
        batch.fill_placeholders(previous_token_ids)
        if self.graphs is not None and self.graphs.can_run(batch):
            return self.graphs.run(batch)
        return self.model.forward(batch, self.kv)

    def encoder_stats(self) -> EncoderCacheStats | None:
        return self.vision.stats() if self.vision is not None else None

    def _vision_embeds(self, output: SchedulerOutput) -> list[tuple[tuple[int, torch.Tensor], ...]]:
        scheduled = output.scheduled
        if self.vision is None:
            return [()] * len(scheduled)
        self.vision.release(output.finished_request_ids + output.preempted_request_ids)
        ranges = [_chunk_range(s) for s in scheduled]
        if all(r is None for r in ranges):
            return [()] * len(scheduled)
        return self.vision.embeds_for(ranges)


def _decode_rows(scheduled: list[ScheduledRequest], placeholder_sources: Mapping[str, int]) -> DecodeRows | None:
    """The step as `DecodeRows` when every chunk is one token of a text request (no M-RoPE, no
    embeddings: what `_sequence_chunk` would make of it); None otherwise."""
    token_ids: list[int] = []
    starts: list[int] = []
    block_ids: list[list[int]] = []
    logits_rows: list[int] = []
    placeholder_rows: list[int] = []
    sources: list[int] = []
    for row, s in enumerate(scheduled):
        request = s.request
        if s.num_new_tokens != 1 or request.multimodal is not None:
            return None
        start = s.num_computed_tokens
        if s.num_placeholder_tokens:
            token_ids.append(0)
            placeholder_rows.append(row)
            sources.append(placeholder_sources[request.request_id])
        else:
            prompt = request.prompt_token_ids
            token_ids.append(prompt[start] if start < len(prompt) else request.output_token_ids[start - len(prompt)])
        starts.append(start)
        block_ids.append(s.block_ids)
        if s.samples:
            logits_rows.append(row)
    return DecodeRows(token_ids, starts, block_ids, None if len(logits_rows) == len(starts) else logits_rows,
                      placeholder_rows, sources)


def _sequence_chunk(s: ScheduledRequest, embeds: tuple[tuple[int, torch.Tensor], ...],
                    placeholder_sources: Mapping[str, int]) -> SequenceChunk:
    """The chunk with its positions: M-RoPE rows only where it computes prompt tokens of a multimodal
    request of an M-RoPE family; elsewhere (decode, text, 1-D RoPE families) every axis is p + delta,
    so 1-D positions carry it. A placeholder token (at most one: the decode input the step in flight
    samples) is built as 0 and filled on the device."""
    start, end = s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens
    mm = s.request.multimodal
    delta, rows = 0, None
    if mm is not None and mm.mrope_positions is not None:
        delta = mm.mrope_delta
        if start < mm.mrope_positions.shape[1]:
            rows = positions_for_range(mm.mrope_positions, delta, start, end)
    if not s.num_placeholder_tokens:
        return SequenceChunk(s.token_ids, start, s.block_ids, s.samples, rows, embeds, delta)
    assert s.num_placeholder_tokens == 1 and s.num_new_tokens == 1, "a placeholder is a one-token decode"
    return SequenceChunk([0], start, s.block_ids, s.samples, rows, embeds, delta,
                         placeholder_sources[s.request.request_id])


def _chunk_range(s: ScheduledRequest) -> ChunkRange | None:
    """The chunk's token range when it may overlap a span (None: text, or past the last span)."""
    mm = s.request.multimodal
    if mm is None or not mm.spans or s.num_computed_tokens >= mm.spans[-1].offset + mm.spans[-1].length:
        return None
    return ChunkRange(s.request.request_id, mm, s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens)


def _wanted_blocks(engine: LoadedEngine, config: EngineConfig) -> int:
    """Enough blocks for max_batch_size full sequences: more would never be used."""
    build = engine.build
    return (config.max_batch_size or build.max_batch_size) * -(-build.max_seq_len // build.tokens_per_block)


def _use_cuda_graphs(engine: LoadedEngine, config: EngineConfig, device: torch.device, model: DecoderModel) -> bool:
    """CUDA, asked for, graph-safe ops, and a float KV cache (the one-byte cache's attention syncs the host)."""
    return (device.type == "cuda" and config.enable_cuda_graphs and model.ops.graph_safe
            and engine.llm_config.kv_cache_quant_algo is None)
