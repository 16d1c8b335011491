"""The vision stages of a vision-language build, whatever the family: convert, export to ONNX, compile.

What it is for: composing builder/vision_convert.py, builder/vision_export.py and
builder/vision_trt.py into the `vision/` part of an engine directory, and the
manifest entries that describe it (`components.vision`, `compile.tensorrt_vision`).
Not for: any stage's internals, or validation (builder/validate_vision.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from builder.convert import ConversionError
from builder.families import build_family_for
from builder.families.base import BuildFamily
from builder.progress import Progress
from builder.vision_convert import write_vision
from builder.vision_export import export_vision_onnx
from builder.vision_trt import PLAN_FILE, build_vision_plan, tensorrt_missing_reason

VISION_DIR = "vision"
NUM_STAGES = 3


@dataclass(frozen=True, slots=True)
class VisionBuild:
    component: dict[str, Any]        # engine.json components.vision
    compile: dict[str, Any]          # engine.json compile.tensorrt_vision


def build_vision(work: Path, hf_dir: Path, dtype: str, preprocessing: dict[str, Any] | None,
                 hf_state: dict[str, torch.Tensor], progress: Progress, family: BuildFamily | None = None
                 ) -> VisionBuild:
    """`family`: the checkpoint's (builder/families/); by default found from its config.json model_type."""
    if family is None:
        family = _family_of(hf_dir)
    out = work / VISION_DIR
    with progress.stage("convert the vision tower"):
        cfg, weights = write_vision(out, family.vision_config_json(hf_dir, dtype, preprocessing), hf_state, family)
        num_params = sum(t.numel() for t in weights.values())
        progress.note(f"{cfg.model_type}, {len(weights)} tensors, {num_params / 1e6:.1f}M parameters, dtype {cfg.dtype}")
    with progress.stage("export the vision tower to ONNX"):
        exported = export_vision_onnx(out, cfg, weights, work)
        progress.note(f"{exported.onnx}" + (f" + {exported.onnx_data}" if exported.onnx_data else "")
                      + f", traced on grids {list(exported.export_grids)}, patch count dynamic")
    del weights
    component: dict[str, Any] = {"config": f"{VISION_DIR}/config.json",
                                 "weights": f"{VISION_DIR}/encoder.safetensors", "onnx": exported.onnx}
    if exported.onnx_data:
        component["onnx_data"] = exported.onnx_data
    reason = tensorrt_missing_reason()
    if reason is not None:
        progress.skip("compile the vision tower with TensorRT", reason)
        return VisionBuild(component, {"built": False, "reason": reason})
    with progress.stage("compile the vision tower with TensorRT"):
        try:
            profile = build_vision_plan(out / "encoder.onnx", out / PLAN_FILE, cfg, cfg.dtype)
        except Exception as exc:    # a TensorRT failure leaves the ONNX / PyTorch paths usable: record it
            (out / PLAN_FILE).unlink(missing_ok=True)
            reason = f"TensorRT build failed: {exc.__class__.__name__}: {exc}"
            progress.note(reason)
            return VisionBuild(component, {"built": False, "reason": reason})
    component["plan"] = f"{VISION_DIR}/{PLAN_FILE}"
    return VisionBuild(component, {"built": True, "profile_patches": [profile.min, profile.opt, profile.max]})


def _family_of(hf_dir: Path) -> BuildFamily:
    model_type = json.loads((hf_dir / "config.json").read_text()).get("model_type")
    family = build_family_for(str(model_type))
    if family is None:
        raise ConversionError(f"{hf_dir / 'config.json'}: model_type {model_type!r} is no vision-language family")
    return family
