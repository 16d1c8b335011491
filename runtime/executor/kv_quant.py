"""The one-byte KV cache (TensorRT-LLM kv_cache_quant_algo INT8 / FP8): storage dtype, write, attention.

What it is for: the paged pool of an engine whose `llm/config.json` says
`kv_cache_quant_algo` INT8 or FP8 holds one byte per element (int8, or the
bytes of float8_e4m3fn) with one static scale per layer, the checkpoint's
`attention.kv_cache_scaling_factor` (the dequantization scale: value = byte * scale).
Writes quantize k and v with it; attention dequantizes the blocks that this
step's block tables reference into a compact float pool and runs the same
paged-attention op as the float cache. At a fixed memory budget the pool
holds twice the blocks of a bf16 cache (four times fp32's).
Not for: block ownership (runtime/core/kv_cache.py) or the attention math itself (plugins/).
"""
from __future__ import annotations

import torch

from engine_format.llm_config import LLMConfig
from plugins.registry import OpSet

INT8_MAX = 127.0
FP8_MAX = 448.0


def kv_storage_dtype(cfg: LLMConfig, model_dtype: torch.dtype) -> torch.dtype:
    """The element type of the pool: int8 (INT8), uint8 holding float8_e4m3fn bytes (FP8), else the model's."""
    algo = cfg.kv_cache_quant_algo
    if algo == "INT8":
        return torch.int8
    if algo == "FP8":
        return torch.uint8           # index_copy_ has no float8 kernel on CPU; the bytes are viewed as fp8
    return model_dtype


def quantize_kv(x: torch.Tensor, scale: torch.Tensor, algo: str) -> torch.Tensor:
    y = x.float() / scale
    if algo == "INT8":
        return torch.round(y).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return y.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor, algo: str, dtype: torch.dtype) -> torch.Tensor:
    values = x.view(torch.float8_e4m3fn) if algo == "FP8" else x
    return (values.float() * scale).to(dtype)


def write_kv_cache_quant(ops: OpSet, key_cache: torch.Tensor, value_cache: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, slot_mapping: torch.Tensor, scale: torch.Tensor, algo: str) -> None:
    ops.write_kv_cache(key_cache, value_cache, quantize_kv(k, scale, algo), quantize_kv(v, scale, algo),
                       slot_mapping)


def paged_attention_quant(ops: OpSet, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          block_tables: torch.Tensor, seq_lens: list[int], query_lens: list[int], scale: float,
                          kv_scale: torch.Tensor, algo: str) -> torch.Tensor:
    """Dequantize only the blocks in `block_tables` (renumbered 0..U-1), then the float paged attention."""
    used = torch.unique(block_tables)
    lookup = torch.zeros(key_cache.shape[0], dtype=torch.int64, device=q.device)
    lookup[used] = torch.arange(used.numel(), device=q.device)
    keys = dequantize_kv(key_cache.index_select(0, used), kv_scale, algo, q.dtype)
    values = dequantize_kv(value_cache.index_select(0, used), kv_scale, algo, q.dtype)
    return ops.paged_attention(q, keys, values, lookup[block_tables], seq_lens, query_lens, scale)
