"""Tensor names, shapes and dtypes of the TensorRT-LLM checkpoint for Llama / Qwen2.

What it is for: the single statement of which tensors `llm/rank0.safetensors`
holds, their shapes and, for quantized engines, their dtypes, used by the
builder (to write them) and the loader (to check them). Linear weights are
[out, in] as in TensorRT-LLM, except where an algorithm's loader says otherwise
(see `quantized_linear_tensors`).
Not for: the HF -> checkpoint mapping itself (builder/convert.py) or quantizing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine_format.errors import EngineLoadError
from engine_format.llm_config import LLMConfig
from engine_format.safetensors_check import read_header_with_names

SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# The linear layers of one decoder layer (TensorRT-LLM names); lm_head stays unquantized.
LINEAR_NAMES = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str                 # safetensors dtype name: F32, BF16, I8, F8_E4M3, ...


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


def linear_shapes(cfg: LLMConfig) -> dict[str, tuple[int, int]]:
    """Linear layer base name (without `.weight`) -> (out, in) of every decoder layer."""
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    qkv_out = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_size
    per_layer = {"attention.qkv": (qkv_out, hidden), "attention.dense": (hidden, cfg.num_attention_heads * cfg.head_size),
                 "mlp.fc": (inter, hidden), "mlp.gate": (inter, hidden), "mlp.proj": (hidden, inter)}
    return {f"{layer_prefix(i)}.{name}": shape for i in range(cfg.num_hidden_layers) for name, shape in per_layer.items()}


def quantized_linear_tensors(algo: str, out_features: int, in_features: int, group_size: int,
                             dtype: str) -> dict[str, TensorSpec]:
    """Suffix -> spec of one quantized linear layer, as TensorRT-LLM's checkpoint loader reads it.

    Sources (NVIDIA/TensorRT-LLM): tensorrt_llm/quantization/layers.py (the layers' Parameters) and
    tensorrt_llm/models/modeling_utils.py `preprocess_perlayer_weights` (what it does to checkpoint tensors
    before loading them into those Parameters):
    - W8A16: WeightOnlyQuantLinear.weight int8 (in, out) + per_channel_scale (out,) in the model dtype; an
      int8 `weight` is passed through unchanged (a float one is quantized by the loader).
    - W4A16_AWQ: int8 `weight` [out/2, in] (two int4 per byte along out; the loader transposes it and
      packs it for the mixed GEMM), `weights_scaling_factor` [out, in/group] (transposed on load),
      `prequant_scaling_factor` [in] (reshaped to (1, in)); WeightOnlyGroupwiseQuantLinear.
    - W8A8_SQ_PER_CHANNEL: Model Optimizer's names, as Int8SmoothQuantLinear declares them:
      `weights_scaling_factor` f32 (out,), `activation_scaling_factor` f32 (1,), `prequant_scaling_factor`
      (in,); the weight is stored as int8 [out, in].
    - FP8: FP8Linear: `weight` float8_e4m3fn [out, in] (an int8 one is viewed as fp8 on load),
      `weights_scaling_factor` and `activation_scaling_factor` f32 (1,).
    """
    model = SAFETENSORS_DTYPES[dtype]
    n, k = out_features, in_features
    if algo == "W8A16":
        return {"weight": TensorSpec((k, n), "I8"), "per_channel_scale": TensorSpec((n,), model)}
    if algo == "W4A16_AWQ":
        return {"weight": TensorSpec((n // 2, k), "I8"),
                "weights_scaling_factor": TensorSpec((n, k // group_size), model),
                "prequant_scaling_factor": TensorSpec((k,), model)}
    if algo == "W8A8_SQ_PER_CHANNEL":
        return {"weight": TensorSpec((n, k), "I8"), "weights_scaling_factor": TensorSpec((n,), "F32"),
                "activation_scaling_factor": TensorSpec((1,), "F32"),
                "prequant_scaling_factor": TensorSpec((k,), model)}
    if algo == "FP8":
        return {"weight": TensorSpec((n, k), "F8_E4M3"), "weights_scaling_factor": TensorSpec((1,), "F32"),
                "activation_scaling_factor": TensorSpec((1,), "F32")}
    raise ValueError(f"quant_algo: {algo!r} has no checkpoint layout")


def expected_tensors(cfg: LLMConfig) -> dict[str, TensorSpec]:
    """Every tensor of `llm/rank0.safetensors` for this config, quantized or not."""
    model = SAFETENSORS_DTYPES[cfg.dtype]
    specs = {name: TensorSpec(shape, model) for name, shape in expected_tensor_shapes(cfg).items()}
    if cfg.quant_algo is not None:
        for base, (n, k) in linear_shapes(cfg).items():
            del specs[f"{base}.weight"]
            for suffix, spec in quantized_linear_tensors(cfg.quant_algo, n, k, cfg.quant.group_size,
                                                         cfg.dtype).items():
                specs[f"{base}.{suffix}"] = spec
    if cfg.kv_cache_quant_algo is not None:
        # tensorrt_llm/models/modeling_utils.py preprocess_weights: `kv_cache_scaling_factor` (the dequant
        # scale) and its reciprocal `kv_cache_rcp_scaling_factor`, one float per layer's attention.
        for i in range(cfg.num_hidden_layers):
            for name in ("kv_cache_scaling_factor", "kv_cache_rcp_scaling_factor"):
                specs[f"{layer_prefix(i)}.attention.{name}"] = TensorSpec((1,), "F32")
    return specs


def check_checkpoint_header(path: Path, rel: str, cfg: LLMConfig, config_name: str = "llm/config.json") -> None:
    """Names, shapes and dtypes of a checkpoint file against its config, from the header only."""
    expected = expected_tensors(cfg)
    header = read_header_with_names(path, rel, expected)
    quant = f", quant_algo {cfg.quant_algo}" if cfg.quant_algo else ""
    for name, spec in expected.items():
        got_dtype, got = header[name]
        if got != spec.shape:
            raise EngineLoadError(rel, f"shape {list(got)} disagrees with {config_name} (expected {list(spec.shape)})",
                                  name)
        if got_dtype != spec.dtype:
            raise EngineLoadError(rel, f"dtype {got_dtype} disagrees with {config_name} dtype {cfg.dtype}{quant} "
                                  f"(expected {spec.dtype})", name)
