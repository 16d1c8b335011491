"""The PyTorch LLM executor: a loaded engine, its KV storage, one forward per step.

What it is for: turning a `SchedulerOutput` into logits for the requests that
sample, on CPU or CUDA, and sizing the KV pool at start-up (`EngineLayout`).
On a VL engine each chunk also gets its M-RoPE positions and the vision
embeddings of the placeholder rows it computes (runtime/encoder_cache.py).
Not for: choosing tokens (runtime/sampler.py) or which requests run.
"""
from __future__ import annotations

import numpy as np
import torch

from runtime.config import EngineConfig, EngineLayout
from runtime.encoder_cache import ChunkRange, EncoderCache, EncoderCacheStats, VisionEmbedder
from runtime.engine_dir import LoadedEngine
from runtime.forward_batch import ForwardBatch, SequenceChunk
from runtime.kv_storage import KVStorage, bytes_per_block
from runtime.model import DecoderModel
from runtime.mrope import positions_for_range
from runtime.scheduler import ScheduledRequest, SchedulerOutput
from runtime.vision_encoder import load_vision_encoder


class PyTorchExecutor:
    def __init__(self, engine: LoadedEngine, config: EngineConfig) -> None:
        device = config.torch_device()
        self.model = DecoderModel(engine.llm_config, engine.weights, device)
        block_size = engine.build.tokens_per_block
        per_block = bytes_per_block(engine.llm_config, block_size, self.model.dtype)
        num_blocks = config.num_kv_blocks or _default_num_blocks(engine, config, device, per_block)
        self.layout = EngineLayout(device, num_blocks, block_size, per_block)
        self.kv = KVStorage(engine.llm_config, num_blocks, block_size, self.model.dtype, device)
        self.mrope = engine.llm_config.mrope_section is not None
        self.vision: VisionEmbedder | None = None
        if engine.vision is not None:
            encoder = load_vision_encoder(engine, config.vision_backend, device)
            self.vision = VisionEmbedder(encoder, EncoderCache(config.encoder_cache_tokens),
                                         config.max_encoder_patches)

    def execute(self, output: SchedulerOutput) -> torch.Tensor:
        """Logits [number of sampling requests, vocab], rows in scheduling order."""
        scheduled = output.scheduled
        embeds = self._vision_embeds(scheduled)
        chunks = [SequenceChunk(s.token_ids, s.num_computed_tokens, s.block_ids, s.samples,
                                self._mrope_positions(s), e) for s, e in zip(scheduled, embeds)]
        batch = ForwardBatch.build(chunks, self.layout.tokens_per_block, self.layout.device, self.mrope)
        return self.model.forward(batch, self.kv)

    def encoder_stats(self) -> EncoderCacheStats | None:
        return self.vision.stats() if self.vision is not None else None

    def _mrope_positions(self, s: ScheduledRequest) -> np.ndarray | None:
        mm = s.request.multimodal
        if not self.mrope or mm is None:
            return None      # 1-D RoPE, or text on an M-RoPE model (every axis the 1-D position)
        return positions_for_range(mm.mrope_positions, mm.mrope_delta, s.num_computed_tokens,
                                   s.num_computed_tokens + s.num_new_tokens)

    def _vision_embeds(self, scheduled: list[ScheduledRequest]) -> list[tuple[tuple[int, torch.Tensor], ...]]:
        ranges = [ChunkRange(s.request.multimodal, s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens)
                  if s.request.multimodal is not None else None for s in scheduled]
        if self.vision is None or all(r is None for r in ranges):
            return [()] * len(scheduled)
        return self.vision.embeds_for(ranges)


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
