"""The one-byte KV cache (TensorRT-LLM kv_cache_quant_algo INT8 / FP8): storage dtype, write, attention.

What it is for: the paged pool of an engine whose `llm/config.json` says
`kv_cache_quant_algo` INT8 or FP8 holds one byte per element (int8, or the
bytes of float8_e4m3fn) with one static scale per layer, the checkpoint's
`attention.kv_cache_scaling_factor` (the dequantization scale: value = byte * scale).
Writes quantize k and v with it; attention decodes only the blocks that this
step's sequences read, through a 256-entry table of every byte's dequantized
value (built once per layer at load: `kv_byte_tables`), into a compact float
pool, and runs the same paged-attention op as the float cache (the op set's
`dequantize_kv_context`: plugins/reference/kv_dequant.py, plugins/cpu/kv_dequant.py).
The table makes decoding exact by construction and avoids the float8
conversion, which is scalar code on a CPU without fp8. At a fixed memory budget
the pool holds twice the blocks of a bf16 cache (four times fp32's).
Not for: block ownership (runtime/core/kv_cache.py) or the attention math itself (plugins/).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from engine_format.checkpoint_layout import layer_prefix
from engine_format.llm_config import LLMConfig
from plugins.attention_metadata import AttentionMetadata
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


def kv_byte_table(scale: torch.Tensor, algo: str, dtype: torch.dtype) -> torch.Tensor:
    """[256]: entry b is `dequantize_kv` of the stored byte b (int8 codes are their bytes' two's complement)."""
    codes = torch.arange(256, dtype=torch.int64, device=scale.device).to(torch.uint8)
    return dequantize_kv(codes.view(torch.int8) if algo == "INT8" else codes, scale, algo, dtype)


def kv_byte_tables(cfg: LLMConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """One byte table per layer from its `attention.kv_cache_scaling_factor`; [] for a float cache."""
    algo = cfg.kv_cache_quant_algo
    if algo is None:
        return []
    return [kv_byte_table(weights[f"{layer_prefix(i)}.attention.kv_cache_scaling_factor"], algo, dtype)
            for i in range(cfg.num_hidden_layers)]


def write_kv_cache_quant(ops: OpSet, key_cache: torch.Tensor, value_cache: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, slot_mapping: torch.Tensor, scale: torch.Tensor, algo: str) -> None:
    ops.write_kv_cache(key_cache, value_cache, quantize_kv(k, scale, algo), quantize_kv(v, scale, algo),
                       slot_mapping)


def paged_attention_quant(ops: OpSet, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          metadata: AttentionMetadata, scale: float, byte_table: torch.Tensor) -> torch.Tensor:
    """Decode only the blocks the sequences read (`byte_table`: the layer's, in q's dtype), then the float
    paged attention over them."""
    keys, values, tables = ops.dequantize_kv_context(key_cache, value_cache, metadata, byte_table)
    return ops.paged_attention_meta(q, keys, values, replace(metadata, block_tables=tables), scale)
