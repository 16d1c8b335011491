"""Helpers for the quantization tests: a small LLMConfig carrying a quantization spec."""
from __future__ import annotations

from engine_format.llm_config import LLMConfig
from engine_format.quant_config import QuantSpec


def tiny_cfg(dtype: str = "float32", quant: QuantSpec = QuantSpec(), layers: int = 1) -> LLMConfig:
    return LLMConfig(architecture="Qwen2ForCausalLM", dtype=dtype, vocab_size=64, hidden_size=128,
                     num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_size=32,
                     intermediate_size=256, norm_epsilon=1e-6, max_position_embeddings=256, rotary_base=10000.0,
                     rotary_scaling=None, tie_word_embeddings=True, attn_bias=True, quant=quant)
