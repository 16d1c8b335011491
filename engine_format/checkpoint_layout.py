"""Tensor names and shapes of the TensorRT-LLM checkpoint for Llama / Qwen2.

What it is for: the single statement of which tensors `llm/rank0.safetensors`
holds and their shapes, used by the builder (to write them) and the loader (to
check them). Linear weights are [out, in] as in TensorRT-LLM.
Not for: the HF -> checkpoint mapping itself (builder/convert.py).
"""
from __future__ import annotations

from engine_format.llm_config import LLMConfig


def layer_prefix(layer: int) -> str:
    return f"transformer.layers.{layer}"


def expected_tensor_shapes(cfg: LLMConfig) -> dict[str, tuple[int, ...]]:
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    qkv_out = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_size
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.vocab_embedding.weight": (cfg.vocab_size, hidden),
        "transformer.ln_f.weight": (hidden,),
        "lm_head.weight": (cfg.vocab_size, hidden),
    }
    for i in range(cfg.num_hidden_layers):
        p = layer_prefix(i)
        shapes[f"{p}.input_layernorm.weight"] = (hidden,)
        shapes[f"{p}.attention.qkv.weight"] = (qkv_out, hidden)
        if cfg.attn_bias:
            shapes[f"{p}.attention.qkv.bias"] = (qkv_out,)
        shapes[f"{p}.attention.dense.weight"] = (hidden, cfg.num_attention_heads * cfg.head_size)
        shapes[f"{p}.post_layernorm.weight"] = (hidden,)
        shapes[f"{p}.mlp.fc.weight"] = (inter, hidden)      # HF gate_proj
        shapes[f"{p}.mlp.gate.weight"] = (inter, hidden)    # HF up_proj
        shapes[f"{p}.mlp.proj.weight"] = (hidden, inter)    # HF down_proj
    return shapes
