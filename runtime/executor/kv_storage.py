"""The physical KV cache: one key and one value tensor per layer, in blocks.

What it is for: owning the KV memory the executor reads and writes
([num_blocks, tokens_per_block, num_kv_heads, head_size] per layer) and sizing it.
A quantized KV cache (kv_cache_quant_algo INT8 / FP8) stores one byte per element
(runtime/executor/kv_quant.py), so a block costs half of bf16's.
Not for: deciding which request owns which block (runtime/core/kv_cache.py does).
"""
from __future__ import annotations

import torch

from engine_format.llm_config import LLMConfig
from runtime.executor.kv_quant import kv_storage_dtype


def bytes_per_block(cfg: LLMConfig, block_size: int, dtype: torch.dtype) -> int:
    """`dtype`: the model's; the pool's element type follows cfg.kv_cache_quant_algo."""
    element = torch.tensor([], dtype=kv_storage_dtype(cfg, dtype)).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_size * element


class KVStorage:
    def __init__(self, cfg: LLMConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_size)
        dtype = kv_storage_dtype(cfg, dtype)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.key_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.value_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
