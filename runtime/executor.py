"""The PyTorch LLM executor: a loaded engine, its KV storage, one forward per step.

What it is for: turning a `SchedulerOutput` into logits for the requests that
sample, on CPU or CUDA, and sizing the KV pool at start-up (`EngineLayout`).
Not for: choosing tokens (runtime/sampler.py) or which requests run.
"""
from __future__ import annotations

import torch

from runtime.config import EngineConfig, EngineLayout
from runtime.engine_dir import LoadedEngine
from runtime.forward_batch import ForwardBatch, SequenceChunk
from runtime.kv_storage import KVStorage, bytes_per_block
from runtime.model import DecoderModel
from runtime.scheduler import SchedulerOutput


class PyTorchExecutor:
    def __init__(self, engine: LoadedEngine, config: EngineConfig) -> None:
        device = config.torch_device()
        self.model = DecoderModel(engine.llm_config, engine.weights, device)
        block_size = engine.build.tokens_per_block
        per_block = bytes_per_block(engine.llm_config, block_size, self.model.dtype)
        num_blocks = config.num_kv_blocks or _default_num_blocks(engine, config, device, per_block)
        self.layout = EngineLayout(device, num_blocks, block_size, per_block)
        self.kv = KVStorage(engine.llm_config, num_blocks, block_size, self.model.dtype, device)

    def execute(self, output: SchedulerOutput) -> torch.Tensor:
        """Logits [number of sampling requests, vocab], rows in scheduling order."""
        chunks = [SequenceChunk(s.token_ids, s.num_computed_tokens, s.block_ids, s.samples)
                  for s in output.scheduled]
        batch = ForwardBatch.build(chunks, self.layout.tokens_per_block, self.layout.device)
        return self.model.forward(batch, self.kv)


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
