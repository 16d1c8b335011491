"""Convert an HF Llama / Qwen2 / Qwen2-VL checkpoint's LLM to TensorRT-LLM's checkpoint layout.

What it is for: the per-family weight mapping of REFERENCE.md section 3 (qkv
concatenation, gate_proj -> mlp.fc, up_proj -> mlp.gate, tied embeddings) and
the matching `llm/config.json`, including the language model of Qwen2-VL /
Qwen2.5-VL (M-RoPE, both the hub's `model.layers.*` and transformers 5's
`model.language_model.layers.*` key layouts). The output feeds `trtllm-build`
unchanged and is exactly what the PyTorch executor reads.
Not for: quantization (a later stage), the vision tower (builder/vision_convert.py)
or loading checkpoints for serving.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from engine_format.checkpoint_layout import expected_tensor_shapes, layer_prefix
from engine_format.llm_config import QWEN_TYPES, SHORT_DTYPES, MROPE_ARCHITECTURES, LLMConfig

HF_PREFIX = "model."                       # text models and the hub's Qwen2-VL checkpoints
HF_VL_TEXT_PREFIX = "model.language_model."   # transformers 5 in-memory names of the VL language model


class ConversionError(RuntimeError):
    """The HF checkpoint cannot be converted; names the tensor or config field."""


def text_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The language model's fields: transformers 5 nests them in `text_config`, hub VL configs are flat."""
    sub = hf_config.get("text_config")
    if not isinstance(sub, dict) or "hidden_size" not in sub:
        return hf_config
    return {**sub, "tie_word_embeddings": hf_config.get("tie_word_embeddings", sub.get("tie_word_embeddings", False))}


def llm_config_from_hf(full_config: dict[str, Any], architecture: str, dtype: str,
                       text: dict[str, Any] | None = None) -> LLMConfig:
    """`text`: the language model's HF fields where a vision-language family keeps them elsewhere."""
    hf_config = text if text is not None else text_config(full_config)
    heads = hf_config["num_attention_heads"]
    hidden = hf_config["hidden_size"]
    head_size = hf_config.get("head_dim") or hidden // heads
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", hf_config.get("rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    mrope_section = rope.pop("mrope_section", None)
    if architecture in MROPE_ARCHITECTURES:
        scaling = _mrope_scaling(mrope_section, rope_type, head_size)
    elif rope_type == "default":
        scaling = None
    elif rope_type in ("llama3", "linear"):
        scaling = {"type": rope_type, **rope}
    else:
        raise ConversionError(f"config.json: rope type {rope_type!r} is not supported (default, linear, llama3)")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"config.json: hidden_act {hf_config['hidden_act']!r} is not supported (silu)")
    return LLMConfig(
        architecture=architecture, dtype=SHORT_DTYPES[dtype], vocab_size=hf_config["vocab_size"],
        hidden_size=hidden, num_hidden_layers=hf_config["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=hf_config.get("num_key_value_heads") or heads,
        head_size=head_size,
        intermediate_size=hf_config["intermediate_size"], norm_epsilon=float(hf_config["rms_norm_eps"]),
        max_position_embeddings=hf_config["max_position_embeddings"], rotary_base=float(rope_theta),
        rotary_scaling=scaling, tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        attn_bias=True if architecture in QWEN_TYPES else bool(hf_config.get("attention_bias", False)),
        position_embedding_type="mrope" if scaling and scaling["type"] == "mrope" else "rope_gpt_neox")


def _mrope_scaling(section: Any, rope_type: str, head_size: int) -> dict[str, Any]:
    """TensorRT-LLM's spelling for Qwen2-VL: rotary_scaling = {"type": "mrope", "mrope_section": [t, h, w]}."""
    if rope_type not in ("default", "mrope"):
        raise ConversionError(f"config.json: rope type {rope_type!r} is not supported for Qwen2-VL (mrope)")
    if not (isinstance(section, list) and len(section) == 3 and sum(section) == head_size // 2):
        raise ConversionError(f"config.json: rope mrope_section must be 3 integers summing to head_dim / 2 "
                              f"({head_size // 2}), got {section!r}")
    return {"type": "mrope", "mrope_section": [int(x) for x in section]}


def read_hf_state_dict(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{hf_dir}: no *.safetensors weights (PyTorch .bin checkpoints are not supported)")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(str(path)))
    return state


def llm_prefix(hf: dict[str, torch.Tensor]) -> str:
    """Prefix of the language model's tensors: `model.language_model.` (transformers 5) or `model.`."""
    return HF_VL_TEXT_PREFIX if any(k.startswith(HF_VL_TEXT_PREFIX) for k in hf) else HF_PREFIX


def convert_state_dict(hf: dict[str, torch.Tensor], cfg: LLMConfig, prefix: str | None = None,
                       lm_head: str = "lm_head.weight") -> dict[str, torch.Tensor]:
    """Map HF tensors to checkpoint tensors, cast to the config dtype, shapes checked. `prefix` / `lm_head`:
    where a vision-language family's checkpoint keeps the LLM (builder/families/, LLMKeys)."""
    prefix = prefix if prefix is not None else llm_prefix(hf)

    def take(name: str) -> torch.Tensor:
        if prefix + name not in hf:
            raise ConversionError(f"HF checkpoint is missing tensor {prefix + name!r}")
        return hf[prefix + name]

    out: dict[str, torch.Tensor] = {
        "transformer.vocab_embedding.weight": take("embed_tokens.weight"),
        "transformer.ln_f.weight": take("norm.weight"),
    }
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["transformer.vocab_embedding.weight"]
    elif lm_head in hf:
        out["lm_head.weight"] = hf[lm_head]
    else:
        raise ConversionError(f"HF checkpoint is missing tensor {lm_head!r} (tie_word_embeddings is false)")
    for i in range(cfg.num_hidden_layers):
        src, dst = f"layers.{i}.", layer_prefix(i) + "."
        attn = src + "self_attn."
        out[dst + "input_layernorm.weight"] = take(src + "input_layernorm.weight")
        out[dst + "attention.qkv.weight"] = torch.cat(
            [take(attn + f"{p}_proj.weight") for p in "qkv"], dim=0)
        if cfg.attn_bias:
            out[dst + "attention.qkv.bias"] = torch.cat([take(attn + f"{p}_proj.bias") for p in "qkv"], dim=0)
        out[dst + "attention.dense.weight"] = take(attn + "o_proj.weight")
        out[dst + "post_layernorm.weight"] = take(src + "post_attention_layernorm.weight")
        out[dst + "mlp.fc.weight"] = take(src + "mlp.gate_proj.weight")
        out[dst + "mlp.gate.weight"] = take(src + "mlp.up_proj.weight")
        out[dst + "mlp.proj.weight"] = take(src + "mlp.down_proj.weight")
    dtype = getattr(torch, cfg.dtype)
    for name, shape in expected_tensor_shapes(cfg).items():
        if tuple(out[name].shape) != shape:
            raise ConversionError(f"{name}: HF tensor shape {list(out[name].shape)} does not match the config "
                                  f"(expected {list(shape)})")
        out[name] = out[name].to(dtype).contiguous().clone()
    return out


def write_checkpoint(out_dir: Path, cfg: LLMConfig, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg.to_json(), indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out_dir / "rank0.safetensors"), metadata={"format": "pt"})
