"""The LLM's architecture as written in the TensorRT-LLM checkpoint config.json.

What it is for: parsing and validating `llm/config.json` (the TensorRT-LLM
pretrained-config layout, REFERENCE.md section 3) into a frozen dataclass that
the executor and the loader share, and writing it back out for the builder.
Not for: build settings (engine.json) or weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine_format.errors import EngineLoadError
from engine_format.quant_config import QuantSpec

TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
SHORT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# LLM architectures with M-RoPE positions (Qwen2-VL's two). Vision-language families on a 1-D RoPE LLM
# (docs/design/families.md) write their text model's architecture.
MROPE_ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", *MROPE_ARCHITECTURES)
# TensorRT-LLM's QWenConfig: qwen_type per architecture (it uses "qwen2_vl" for both VL generations).
QWEN_TYPES = {"Qwen2ForCausalLM": "qwen2", "Qwen2VLForConditionalGeneration": "qwen2_vl",
              "Qwen2_5_VLForConditionalGeneration": "qwen2_vl"}


@dataclass(frozen=True, slots=True)
class LLMConfig:
    architecture: str
    dtype: str                      # float32 | float16 | bfloat16
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_size: int
    intermediate_size: int
    norm_epsilon: float
    max_position_embeddings: int
    rotary_base: float
    rotary_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    attn_bias: bool
    hidden_act: str = "silu"
    position_embedding_type: str = "rope_gpt_neox"
    logits_dtype: str = "float32"
    quant: QuantSpec = QuantSpec()

    @property
    def quant_algo(self) -> str | None:
        return self.quant.quant_algo

    @property
    def kv_cache_quant_algo(self) -> str | None:
        return self.quant.kv_cache_quant_algo

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def mrope_section(self) -> tuple[int, int, int] | None:
        """M-RoPE split of the head_size / 2 rotary frequencies over (temporal, height, width), or None."""
        if self.rotary_scaling is None or self.rotary_scaling.get("type") != "mrope":
            return None
        t, h, w = self.rotary_scaling["mrope_section"]
        return int(t), int(h), int(w)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "architecture": self.architecture, "dtype": self.dtype, "logits_dtype": self.logits_dtype,
            "vocab_size": self.vocab_size, "max_position_embeddings": self.max_position_embeddings,
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_size": self.head_size, "hidden_act": self.hidden_act,
            "intermediate_size": self.intermediate_size, "norm_epsilon": self.norm_epsilon,
            "position_embedding_type": self.position_embedding_type, "rotary_base": self.rotary_base,
            "rotary_scaling": self.rotary_scaling, "tie_word_embeddings": self.tie_word_embeddings,
            "attn_bias": self.attn_bias, "mlp_bias": False,
            "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
            "quantization": self.quant.to_json(),
        }
        if self.architecture in QWEN_TYPES:
            data["qwen_type"] = QWEN_TYPES[self.architecture]
        if self.position_embedding_type == "mrope":
            data["rotary_embedding_dim"] = self.head_size
        return data

    @classmethod
    def from_json(cls, data: Any, file: str) -> "LLMConfig":
        if not isinstance(data, dict):
            raise EngineLoadError(file, "expected a JSON object")
        arch = _get(data, "architecture", str, file)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise EngineLoadError(file, f"{arch!r} is not supported ({', '.join(SUPPORTED_ARCHITECTURES)})",
                                  "architecture")
        dtype = _get(data, "dtype", str, file)
        if dtype not in TORCH_DTYPES:
            raise EngineLoadError(file, f"must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}", "dtype")
        ints = {k: _get(data, k, int, file) for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_size", "intermediate_size", "max_position_embeddings")}
        for key, value in ints.items():
            if value < 1:
                raise EngineLoadError(file, f"must be >= 1, got {value}", key)
        if ints["num_attention_heads"] % ints["num_key_value_heads"]:
            raise EngineLoadError(file, "num_attention_heads must be a multiple of num_key_value_heads",
                                  "num_key_value_heads")
        mapping = data.get("mapping", {"world_size": 1})
        if not isinstance(mapping, dict) or mapping.get("world_size", 1) != 1:
            raise EngineLoadError(file, "only world_size 1 is supported by the PyTorch executor", "mapping")
        quant = QuantSpec.from_json(data.get("quantization"), file)
        scaling = data.get("rotary_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            raise EngineLoadError(file, "expected an object or null", "rotary_scaling")
        position_type = str(data.get("position_embedding_type", "rope_gpt_neox"))
        _check_mrope(position_type, scaling, ints["head_size"], arch, file)
        return cls(
            architecture=arch, dtype=dtype, **ints,
            norm_epsilon=_get(data, "norm_epsilon", float, file),
            rotary_base=_get(data, "rotary_base", float, file),
            rotary_scaling=scaling,
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            attn_bias=bool(data.get("attn_bias", arch in QWEN_TYPES)),
            hidden_act=str(data.get("hidden_act", "silu")),
            position_embedding_type=position_type,
            logits_dtype=str(data.get("logits_dtype", "float32")),
            quant=quant)


def _check_mrope(position_type: str, scaling: dict[str, Any] | None, head_size: int, arch: str, file: str) -> None:
    """M-RoPE architectures use position_embedding_type "mrope" and a 3-part mrope_section, others never."""
    is_mrope = scaling is not None and scaling.get("type") == "mrope"
    if (arch in MROPE_ARCHITECTURES) != (position_type == "mrope") or (position_type == "mrope") != is_mrope:
        raise EngineLoadError(file, f"{arch} needs position_embedding_type 'mrope' with rotary_scaling.type 'mrope' "
                              f"exactly when it is a VL architecture ({', '.join(MROPE_ARCHITECTURES)}); got "
                              f"{position_type!r}", "position_embedding_type")
    if not is_mrope:
        return
    section = scaling.get("mrope_section")
    if (not isinstance(section, list) or len(section) != 3
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in section)
            or sum(section) != head_size // 2):
        raise EngineLoadError(file, f"expected 3 non-negative integers summing to head_size / 2 ({head_size // 2}), "
                              f"got {section!r}", "rotary_scaling.mrope_section")


def _get(data: dict[str, Any], key: str, kind: type, file: str) -> Any:
    if key not in data:
        raise EngineLoadError(file, "missing key", key)
    value = data[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise EngineLoadError(file, f"expected {kind.__name__}, got {type(value).__name__}", key)
    return value
