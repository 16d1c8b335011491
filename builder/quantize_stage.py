"""The quantize stage of the build pipeline: calibrate, pack, describe; and its validation step.

What it is for: the calls builder/pipeline.py makes for a quantized build:
`quantize_engine` (for a VL engine: the engine as built so far, float LLM, is written
and loaded first, since its processor and vision encoder make the calibration images'
embeddings; then `--vision-quant`'s int8 ONNX tower; then the LLM), `quantize_stage`
(float checkpoint tensors -> quantized config + tensors, the optional `llm/hf/`
export, and the manifest's `quantization` entry) and `quantize_report` (the validation
report against the same model unquantized).
Not for: the arithmetic (quantize_pack.py), calibration (quantize.py) or the metrics (quantize_validate.py).
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from builder.calib_data import CalibSample
from builder.quantize import QuantRequest, calibrate
from builder.quantize_pack import quantize_checkpoint
from builder.quantize_validate import validate_quantized
from builder.vision_quant import VisionQuantResult, quantize_vision_onnx
from builder.convert import write_checkpoint
from engine_format.engine_dir import LoadedEngine, load_engine, write_manifest
from engine_format.llm_config import LLMConfig
from engine_format.quant_config import QuantSpec

# What the runtime does for each algorithm, written into engine.json (so a reader knows what "int8" means here).
RUNTIME_KERNELS = {
    "W8A16": {"cpu": "torch._weight_int8pack_mm (int8 weights, activations in the model dtype; on AVX2 CPUs it "
                     "beats the float GEMM only with bf16 activations, docs/perf/quantization.md)",
              "cuda": "Triton W8A16 GEMM (plugins/quant_gemm_triton.py)"},
    "W4A16_AWQ": {"cpu": "torch _weight_int4pack_mm_for_cpu (int4 groups of 128, activations x pre-quant scale)",
                  "cuda": "Triton W4A16 GEMM (plugins/quant_gemm_triton.py)"},
    "W8A8_SQ_PER_CHANNEL": {"cpu": "int8 activations (static per-tensor scale) x int8 weights, torch._int_mm int32 "
                                   "accumulation", "cuda": "torch._int_mm"},
    "FP8": {"cpu": "weights dequantized ONCE AT LOAD to the model dtype (no fast fp8 GEMM on CPU); activations "
                   "rounded through float8_e4m3fn with their static scale", "cuda": "torch._scaled_mm"},
}
KV_KERNELS = {"INT8": "one-byte int8 paged pool, one static scale per layer; attention dequantizes the used blocks",
              "FP8": "one-byte float8_e4m3fn paged pool, one static scale per layer; attention dequantizes the used "
                     "blocks"}


@dataclass(frozen=True, slots=True)
class QuantOutcome:
    cfg: LLMConfig
    tensors: dict[str, torch.Tensor]
    manifest: dict[str, Any]


def quant_input_hash(base_hash: str, req: QuantRequest, samples: list[CalibSample]) -> str:
    """The build's input hash extended by the quantization flags and the calibration samples (texts, pixels)."""
    digest = hashlib.sha256(base_hash.encode())
    digest.update(json.dumps({"quant": req.quant, "kv": req.kv_cache_dtype, "export_hf": req.export_hf,
                              "vision_quant": req.vision_quant, "samples": [s.digest() for s in samples]},
                             sort_keys=True).encode())
    return digest.hexdigest()


def quantize_engine(work: Path, hf_dir: Path, tokenizer_dir: Path, cfg: LLMConfig, tensors: dict[str, torch.Tensor],
                    req: QuantRequest, samples: list[CalibSample], manifest: dict[str, Any]
                    ) -> tuple[QuantOutcome | None, VisionQuantResult | None]:
    """Quantize what `req` asks into `work`: the vision tower's int8 graph (components.vision of `manifest`
    gains `onnx_int8`) and / or the LLM (llm/ holds the quantized checkpoint afterwards)."""
    engine = None
    vision_int8 = None
    if "vision" in manifest["components"]:
        if req.active:       # a float LLM build wrote it already
            write_checkpoint(work / "llm", cfg, tensors)
        engine = _provisional_engine(work, manifest)
        if req.vision_quant is not None:
            vision_int8 = quantize_vision_onnx(engine, [image for s in samples for image in s.images])
            manifest["components"]["vision"]["onnx_int8"] = vision_int8.onnx
            if vision_int8.onnx_data:
                manifest["components"]["vision"]["onnx_int8_data"] = vision_int8.onnx_data
            engine = _provisional_engine(work, manifest)
    quant = None
    if req.active:
        quant = quantize_stage(work, hf_dir, tokenizer_dir, cfg, tensors, req, samples, engine)
        write_checkpoint(work / "llm", quant.cfg, quant.tensors)
    return quant, vision_int8


def _provisional_engine(work: Path, manifest: dict[str, Any]) -> LoadedEngine:
    """The engine as built so far (float LLM), loaded as the server would load it."""
    float_manifest = copy.deepcopy(manifest)
    float_manifest["build"].update(quantization="none", kv_cache_dtype=float_manifest["build"]["dtype"])
    write_manifest(work, float_manifest)
    return load_engine(work, verify_checksums=False)


def quantize_stage(work: Path, hf_dir: Path, tokenizer_dir: Path, cfg: LLMConfig, tensors: dict[str, torch.Tensor],
                   req: QuantRequest, samples: list[CalibSample], engine: LoadedEngine | None = None
                   ) -> QuantOutcome:
    """`engine`: for a VL build, the engine as built so far (float LLM), whose processor and vision encoder
    make the image samples' embeddings."""
    import modelopt

    hf_out = work / "llm" / "hf" if req.export_hf else None
    calib = calibrate(hf_dir, tokenizer_dir, req, samples, hf_out, engine)
    qcfg = replace(cfg, quant=QuantSpec.for_modes(req.quant, req.kv_cache_dtype))
    qtensors = quantize_checkpoint(tensors, qcfg, calib)
    entry: dict[str, Any] = {
        "mode": req.quant or "none", "kv_cache_dtype": req.kv_cache_dtype,
        "quant_algo": qcfg.quant_algo, "kv_cache_quant_algo": qcfg.kv_cache_quant_algo,
        "calibration": {"tool": f"nvidia-modelopt {modelopt.__version__}", "device": "cpu",
                        "data": str(req.calib_data) if req.calib_data else "bundled calib_texts.jsonl"
                        + (" + generated images" if calib.vision_graph is not None else ""),
                        "num_samples": calib.num_samples, "num_tokens": calib.num_tokens},
        "runtime_kernels": RUNTIME_KERNELS.get(qcfg.quant_algo or "", {}),
    }
    if calib.vision_graph is not None:
        entry["calibration"].update(
            num_images=calib.num_images,
            images="runtime processor + vision encoder on vision/" + calib.vision_graph + "; embeddings at the "
                   "placeholder rows of the HF language model's inputs_embeds" + ("" if req.calib_data else
                   "; generated images: builder/calib_images.py"))
    if qcfg.kv_cache_quant_algo:
        entry["kv_cache"] = KV_KERNELS[qcfg.kv_cache_quant_algo]
    if hf_out is not None:
        entry["hf_checkpoint"] = {"dir": "llm/hf", "format": "Model Optimizer unified HF checkpoint "
                                  "(hf_quant_config.json)"}
    return QuantOutcome(qcfg, qtensors, entry)


def quantize_report(engine: LoadedEngine, float_cfg: LLMConfig, float_tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    return validate_quantized(engine, float_cfg, float_tensors)


def quant_summary_line(report: dict[str, Any]) -> str:
    return (f"vs unquantized: top-1 agreement {report['top1_agreement']:.3f}, KL {report['kl_divergence']:.2e}, "
            f"max |err| {report['max_abs_err']:.2e}, perplexity {report['perplexity']['engine']:.2f} "
            f"(unquantized {report['perplexity']['reference']:.2f}), passed: {report['passed']}")
