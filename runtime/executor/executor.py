"""The PyTorch LLM executor: a loaded engine, its KV storage, one forward per step.

What it is for: turning a `SchedulerOutput` into logits for the requests that
sample, on CPU or CUDA, and sizing the KV pool at start-up (`EngineLayout`).
On a VL engine each chunk also gets its M-RoPE positions and the vision
embeddings of the placeholder rows it computes (runtime/vision/encoder_cache.py).
Not for: choosing tokens (runtime/executor/sampler.py) or which requests run.
"""
from __future__ import annotations

import torch

from runtime.config import EngineConfig, EngineLayout
from runtime.vision.encoder_cache import ChunkRange, EncoderCache, EncoderCacheStats, VisionEmbedder
from engine_format.engine_dir import LoadedEngine
from runtime.executor.forward_batch import ForwardBatch, SequenceChunk
from runtime.executor.kv_storage import KVStorage, bytes_per_block
from runtime.executor.model import DecoderModel
from runtime.multimodal.mrope import positions_for_range
from runtime.core.scheduler import ScheduledRequest, SchedulerOutput
from runtime.vision.vision_encoder import load_vision_encoder


class PyTorchExecutor:
    def __init__(self, engine: LoadedEngine, config: EngineConfig) -> None:
        device = config.torch_device()
        self.model = DecoderModel(engine.llm_config, engine.weights, device)
        block_size = engine.build.tokens_per_block
        per_block = bytes_per_block(engine.llm_config, block_size, self.model.dtype)
        num_blocks = config.num_kv_blocks or _default_num_blocks(engine, config, device, per_block)
        self.layout = EngineLayout(device, num_blocks, block_size, per_block)
        self.kv = KVStorage(engine.llm_config, num_blocks, block_size, self.model.dtype, device)
        self.vision: VisionEmbedder | None = None
        if engine.vision is not None:
            encoder = load_vision_encoder(engine, config.vision_backend, device)
            self.vision = VisionEmbedder(encoder, EncoderCache(config.encoder_cache_tokens),
                                         config.max_encoder_patches)

    def execute(self, output: SchedulerOutput) -> torch.Tensor:
        """Logits [number of sampling requests, vocab], rows in scheduling order."""
        scheduled = output.scheduled
        embeds = self._vision_embeds(output)
        chunks = [_sequence_chunk(s, e) for s, e in zip(scheduled, embeds)]
        batch = ForwardBatch.build(chunks, self.layout.tokens_per_block, self.layout.device)
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


def _sequence_chunk(s: ScheduledRequest, embeds: tuple[tuple[int, torch.Tensor], ...]) -> SequenceChunk:
    """The chunk with its positions: M-RoPE rows only where it computes prompt tokens of a multimodal
    request; elsewhere (decode, text) every axis is p + delta, so 1-D positions carry it."""
    start, end = s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens
    mm = s.request.multimodal
    delta, rows = 0, None
    if mm is not None:
        delta = mm.mrope_delta
        if start < mm.mrope_positions.shape[1]:
            rows = positions_for_range(mm.mrope_positions, delta, start, end)
    return SequenceChunk(s.token_ids, start, s.block_ids, s.samples, rows, embeds, delta)


def _chunk_range(s: ScheduledRequest) -> ChunkRange | None:
    """The chunk's token range when it may overlap a span (None: text, or past the last span)."""
    mm = s.request.multimodal
    if mm is None or not mm.spans or s.num_computed_tokens >= mm.spans[-1].offset + mm.spans[-1].length:
        return None
    return ChunkRange(s.request.request_id, mm, s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens)


def _default_num_blocks(engine: LoadedEngine, config: EngineConfig, device: torch.device, per_block: int) -> int:
    """Enough blocks for max_batch_size full sequences, within the memory budget."""
    build = engine.build
    wanted = (config.max_batch_size or build.max_batch_size) * -(-build.max_seq_len // build.tokens_per_block)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * config.gpu_memory_fraction)
    else:
        budget = int(config.kv_cache_memory_gib * 2**30)
    return max(1, min(wanted, budget // per_block))
