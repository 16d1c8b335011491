"""The vision stages of a Qwen2-VL / Qwen2.5-VL build: convert, export to ONNX, compile.

What it is for: composing builder/vision_convert.py, builder/vision_export.py and
builder/vision_trt.py into the `vision/` part of an engine directory, and the
manifest entries that describe it (`components.vision`, `compile.tensorrt_vision`).
Not for: any stage's internals, or validation (builder/validate_vision.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from builder.progress import Progress
from builder.vision_convert import vision_config_json, write_vision
from builder.vision_export import export_vision_onnx
from builder.vision_trt import PLAN_FILE, build_vision_plan, tensorrt_missing_reason

VISION_DIR = "vision"
NUM_STAGES = 3


@dataclass(frozen=True, slots=True)
class VisionBuild:
    component: dict[str, Any]        # engine.json components.vision
    compile: dict[str, Any]          # engine.json compile.tensorrt_vision


def build_vision(work: Path, hf_dir: Path, dtype: str, preprocessing: dict[str, Any] | None,
                 hf_state: dict[str, torch.Tensor], progress: Progress) -> VisionBuild:
    out = work / VISION_DIR
    with progress.stage("convert the vision tower"):
        cfg, weights = write_vision(out, vision_config_json(hf_dir, dtype, preprocessing), hf_state)
        progress.note(f"{cfg.model_type}, {cfg.depth} blocks, width {cfg.embed_dim}, dtype {cfg.dtype}")
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
