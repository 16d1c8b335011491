"""Quantization stage: checks of the flags, calibration with NVIDIA Model Optimizer, HF export.

What it is for: `--quant {int8_wo,int4_awq,w8a8_sq,fp8}` / `--kv-cache-dtype {int8,fp8}`
(and the checks of `--vision-quant`, which builder/vision_quant.py does).
The HF model (float32) runs the calibration samples twice: once with forward
pre-hooks that record each linear layer's per-channel input absmax (exact for
any later per-tensor activation scale, fused layers included), once under
Model Optimizer's `mtq.quantize`, whose search gives the AWQ and SmoothQuant
pre-quant scales and whose attention quantizers give the KV-cache amax (k after
RoPE, and v). The TensorRT-LLM tensors are then made by builder/quantize_pack.py.
For a vision-language engine the calibrated module is the HF model's language model,
fed by builder/quantize_vl.py: image samples reach it as the runtime's processor and
vision encoder make them (embeddings at the placeholder rows, M-RoPE positions).
Model Optimizer's own TensorRT-LLM export is not used: in 0.47 it fails on
transformers 5 configs (ZeroDivisionError, missing rotary_base) and clamps FP8
KV scales to >= 1; its unified HF export (`--export-hf`) works and is used.
Not for: the checkpoint layout (engine_format/) or the error measurement (quantize_validate.py).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from builder.calib_data import CalibSample, QuantizeError, read_calib_samples
from builder.vision_quant import check_vision_quant
from engine_format.quant_config import AWQ_GROUP_SIZE, KV_CACHE_MODES, QUANT_MODES

if TYPE_CHECKING:
    from engine_format.engine_dir import LoadedEngine

# TensorRT-LLM linear base (inside transformer.layers.{i}.) -> the HF modules feeding it (same input).
HF_LINEARS: dict[str, tuple[str, ...]] = {
    "attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.dense": ("self_attn.o_proj",), "mlp.fc": ("mlp.gate_proj",), "mlp.gate": ("mlp.up_proj",),
    "mlp.proj": ("mlp.down_proj",),
}
MODELOPT_CONFIGS = {"int8_wo": "INT8_WEIGHT_ONLY_CFG", "int4_awq": "INT4_AWQ_CFG",
                    "w8a8_sq": "INT8_SMOOTHQUANT_CFG", "fp8": "FP8_DEFAULT_CFG"}
MAX_CALIB_TOKENS = 256


@dataclass(frozen=True, slots=True)
class QuantRequest:
    quant: str | None = None
    kv_cache_dtype: str | None = None
    calib_data: Path | None = None
    calib_size: int = 32
    export_hf: bool = False
    vision_quant: str | None = None         # "int8": int8 Q/DQ ONNX vision tower beside the float one

    @property
    def active(self) -> bool:
        """The LLM is quantized (weights and / or KV cache)."""
        return self.quant is not None or self.kv_cache_dtype is not None

    @property
    def calibrates(self) -> bool:
        return self.active or self.vision_quant is not None


@dataclass(slots=True)
class Calibration:
    """Per TensorRT-LLM linear base name (`transformer.layers.{i}.attention.qkv`, ...)."""

    input_absmax: dict[str, torch.Tensor] = field(default_factory=dict)    # [K] per input channel
    prequant: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # Model Optimizer's, one per HF module
    kv_amax: dict[int, float] = field(default_factory=dict)               # layer -> max |k|, |v|
    num_samples: int = 0
    num_tokens: int = 0
    num_images: int = 0
    vision_graph: str | None = None          # VL: the ONNX graph whose embeddings the LLM saw


@dataclass(frozen=True, slots=True)
class CalibTarget:
    """The module Model Optimizer quantizes, its decoder layers, and how one batch runs through it."""

    module: Any
    layers: Any
    batches: list[Any]
    run: Callable[[Any, Any], None]


def check_quant_request(req: QuantRequest, hf_config: dict[str, Any], vision_language: bool) -> list[CalibSample]:
    """Every check that needs no model: raises QuantizeError (one line naming the flag); returns the samples."""
    if req.quant is not None and req.quant not in QUANT_MODES:
        raise QuantizeError(f"--quant: unknown mode {req.quant!r} (choose from {', '.join(QUANT_MODES)})")
    if req.kv_cache_dtype is not None and req.kv_cache_dtype not in KV_CACHE_MODES:
        raise QuantizeError(f"--kv-cache-dtype: unknown {req.kv_cache_dtype!r} (choose from "
                            f"{', '.join(KV_CACHE_MODES)})")
    if req.export_hf and req.quant is None:
        raise QuantizeError("--export-hf: needs --quant (the float checkpoint is the source itself)")
    if req.export_hf and req.kv_cache_dtype == "int8":
        raise QuantizeError("--export-hf: Model Optimizer's unified HF checkpoint has no int8 KV cache (fp8 only); "
                            "drop --kv-cache-dtype int8 or --export-hf")
    check_vision_quant(req.vision_quant, vision_language)
    if vision_language and req.export_hf:
        raise QuantizeError("--export-hf: not written for vision-language engines by this version (the engine's "
                            "llm/ checkpoint is; drop --export-hf)")
    text = hf_config.get("text_config") or hf_config
    if req.quant == "int4_awq":
        for key in ("hidden_size", "intermediate_size"):
            if text[key] % AWQ_GROUP_SIZE:
                raise QuantizeError(f"--quant int4_awq: the model's {key} {text[key]} is not a multiple of the AWQ "
                                    f"group size {AWQ_GROUP_SIZE}")
    if req.quant in ("w8a8_sq", "fp8", "int8_wo") and text["hidden_size"] % 16:
        raise QuantizeError(f"--quant {req.quant}: hidden_size {text['hidden_size']} is not a multiple of 16")
    if not req.calibrates:
        if req.calib_data is not None:
            raise QuantizeError("--calib-data: only used with --quant, --kv-cache-dtype or --vision-quant")
        return []
    if req.active and importlib.util.find_spec("modelopt") is None:
        raise QuantizeError("--quant / --kv-cache-dtype: calibration needs NVIDIA Model Optimizer "
                            "(pip install 'trtserve[quant]', i.e. nvidia-modelopt)")
    samples = read_calib_samples(req.calib_data, req.calib_size, vision_language)
    if req.vision_quant is not None and not any(s.images for s in samples):
        raise QuantizeError(f"--vision-quant: the first {req.calib_size} samples of --calib-data hold no images "
                            "(add \"image\" entries, or leave --calib-data out to use the bundled images)")
    return samples


def calibrate(hf_dir: Path, tokenizer_dir: Path, req: QuantRequest, samples: list[CalibSample],
              hf_export_dir: Path | None, engine: LoadedEngine | None = None) -> Calibration:
    """Run the calibration samples through the HF model (float32, CPU); optionally write Model Optimizer's
    unified HF checkpoint of the same quantization to `hf_export_dir`. `engine`: the VL engine being built
    (its processor and vision encoder make the image samples' embeddings); None for a text model."""
    calib = Calibration()
    if engine is not None and engine.vision is not None:
        from builder.quantize_vl import load_language_model, run_vl_batch, vl_calib_batches

        data = vl_calib_batches(engine, samples)
        calib.num_images, calib.vision_graph = data.num_images, data.vision_graph
        language_model = load_language_model(hf_dir)
        target = CalibTarget(language_model, language_model.layers, list(data.batches), run_vl_batch)
        lengths = [int(b.input_ids.shape[1]) for b in data.batches]
        model = None
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        batches = [torch.tensor([tokenizer(s.text, add_special_tokens=False)["input_ids"][:MAX_CALIB_TOKENS]])
                   for s in samples]
        batches = [b for b in batches if b.shape[1] > 0]
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        target = CalibTarget(model, model.model.layers, batches, lambda m, batch: m(batch))
        lengths = [int(b.shape[1]) for b in batches]
    calib.num_samples, calib.num_tokens = len(lengths), sum(lengths)
    _record_input_absmax(target, calib)
    _modelopt_calibrate(target, req, calib)
    if hf_export_dir is not None and model is not None:
        _export_hf(model, hf_export_dir, tokenizer_dir)
    return calib


@torch.inference_mode()
def _record_input_absmax(target: CalibTarget, calib: Calibration) -> None:
    handles = []
    for i, layer in enumerate(target.layers):
        for base, modules in HF_LINEARS.items():
            key = f"transformer.layers.{i}.{base}"
            module = layer.get_submodule(modules[0])

            def hook(_mod: Any, args: tuple[torch.Tensor, ...], key: str = key) -> None:
                seen = args[0].detach().abs().flatten(0, -2).amax(0).float()
                old = calib.input_absmax.get(key)
                calib.input_absmax[key] = seen if old is None else torch.maximum(old, seen)

            handles.append(module.register_forward_pre_hook(hook))
    try:
        for batch in target.batches:
            target.run(target.module, batch)
    finally:
        for h in handles:
            h.remove()


def _modelopt_config(req: QuantRequest) -> dict[str, Any]:
    import modelopt.torch.quantization as mtq

    if req.quant is not None:
        cfg = copy.deepcopy(getattr(mtq, MODELOPT_CONFIGS[req.quant]))
    else:     # KV cache only: every layer quantizer off
        cfg = {"quant_cfg": [{"quantizer_name": "*", "enable": False}], "algorithm": "max"}
    if req.kv_cache_dtype is not None:
        bits = (4, 3) if req.kv_cache_dtype == "fp8" else 8
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + [
            {"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": bits, "axis": None}}]
    return cfg


def _modelopt_calibrate(target: CalibTarget, req: QuantRequest, calib: Calibration) -> None:
    import modelopt.torch.quantization as mtq

    def forward_loop(m: Any) -> None:
        with torch.no_grad():
            for batch in target.batches:
                target.run(m, batch)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(target.module, _modelopt_config(req), forward_loop)
    for i, layer in enumerate(target.layers):
        if req.quant in ("int4_awq", "w8a8_sq"):
            for base, modules in HF_LINEARS.items():
                scales = []
                for name in modules:
                    pqs = layer.get_submodule(name).input_quantizer.pre_quant_scale
                    if pqs is None:
                        raise QuantizeError(f"--quant {req.quant}: Model Optimizer produced no pre-quant scale for "
                                            f"layer {i} {name} (is the calibration data too small?)")
                    scales.append(pqs.detach().float().flatten().clone())
                calib.prequant[f"transformer.layers.{i}.{base}"] = scales
        if req.kv_cache_dtype is not None:
            attn = layer.self_attn
            amax = max(float(attn.k_bmm_quantizer.amax.max()), float(attn.v_bmm_quantizer.amax.max()))
            calib.kv_amax[i] = amax


def _export_hf(model: Any, out_dir: Path, tokenizer_dir: Path) -> None:
    """Model Optimizer's unified HF checkpoint (hf_quant_config.json + quantized safetensors) + tokenizer."""
    from modelopt.torch.export import export_hf_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_hf_checkpoint(model, export_dir=str(out_dir))
    if not (out_dir / "hf_quant_config.json").is_file():
        raise QuantizeError(f"--export-hf: Model Optimizer wrote no hf_quant_config.json in {out_dir}")
    for path in tokenizer_dir.iterdir():
        if path.is_file() and (path.name.startswith("tokenizer") or path.suffix == ".jinja"):
            shutil.copy2(path, out_dir / path.name)
    json.loads((out_dir / "hf_quant_config.json").read_text())   # parseable
