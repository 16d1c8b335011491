"""The start-up warm-up forward and, on CUDA, the peak memory it reaches.

What it is for: measuring what a step can need beyond the weights before the KV
pool takes the rest: one LLM forward over max_num_tokens tokens spread over
max_batch_size sequences (so the logits rows and the sampler's sort are at their
largest), and for a vision-language engine one encoder call at max_encoder_patches.
PyTorch's allocator gives the peak; runtime/executor/kv_sizing.py turns it into a budget.
Not for: sizing the pool or owning the cache.
"""
from __future__ import annotations

import torch

from engine_format.engine_dir import LoadedEngine
from runtime.config import EngineConfig
from runtime.executor.forward_batch import ForwardBatch, SequenceChunk
from runtime.executor.kv_sizing import GpuMemory
from runtime.executor.kv_storage import KVStorage, bytes_per_block
from runtime.executor.model import DecoderModel
from runtime.families import vision_family
from runtime.vision.vision_encoder import VisionEncoder


def warm_up_forward(model: DecoderModel, encoder: VisionEncoder | None, engine: LoadedEngine,
                    config: EngineConfig) -> tuple[int, int, int]:
    """Run the largest step the limits allow; returns (KV bytes it allocated, logits rows, vision rows)."""
    build = engine.build
    max_num_tokens = config.max_num_tokens or build.max_num_tokens
    num_seqs = max(min(config.max_batch_size or build.max_batch_size, max_num_tokens),
                   -(-max_num_tokens // build.max_seq_len))
    block_size = build.tokens_per_block
    lengths = [max_num_tokens // num_seqs + (i < max_num_tokens % num_seqs) for i in range(num_seqs)]
    chunks, num_blocks = [], 0
    for length in lengths:
        blocks = -(-length // block_size)
        chunks.append(SequenceChunk([i % engine.llm_config.vocab_size for i in range(length)], 0,
                                    list(range(num_blocks, num_blocks + blocks))))
        num_blocks += blocks
    kv = KVStorage(engine.llm_config, num_blocks, block_size, model.dtype, model.device)
    logits = model.forward(ForwardBatch.build(chunks, block_size, model.device), kv)
    torch.sort(torch.softmax(logits, dim=-1), dim=-1, descending=True)
    vision_rows = 0
    if encoder is not None and engine.vision is not None:
        family = vision_family(engine.vision.config)
        grids = family.profile_grids(config.max_encoder_patches)
        pixels = family.random_pixels(grids, torch.Generator().manual_seed(0))
        vision_rows = int(encoder.encode(pixels, grids).shape[0])
    return num_blocks * bytes_per_block(engine.llm_config, block_size, model.dtype), int(logits.shape[0]), vision_rows


def profile_gpu_memory(model: DecoderModel, encoder: VisionEncoder | None, engine: LoadedEngine,
                       config: EngineConfig, device: torch.device) -> GpuMemory:
    """Peak allocated bytes of the warm-up (weights included, its own KV blocks excluded), and the
    driver's view of the GPU afterwards."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    kv_bytes, _, _ = warm_up_forward(model, encoder, engine, config)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - kv_bytes
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return GpuMemory(total, free, torch.cuda.memory_reserved(device), peak)
