"""Compile `vision/encoder.onnx` into a TensorRT plan through polygraphy, where TensorRT is installed.

What it is for: the optional `vision/encoder.plan`, built with one optimisation
profile over the patch count (min / opt / max) for all dynamic inputs. Thin on
purpose: polygraphy does the work; TensorRT and polygraphy's TensorRT backend
are imported only here and only when `tensorrt` can be found, so the build runs
everywhere else and records why the step was skipped.
Not for: running the plan (a TensorRT vision backend would use polygraphy's TrtRunner).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from engine_format.vision_config import MAX_PATCHES_PER_ONNX_CALL, VisionConfig

PLAN_FILE = "encoder.plan"
OPT_PATCHES = 1024          # one 448 x 448 image


@dataclass(frozen=True, slots=True)
class PatchProfile:
    min: int
    opt: int
    max: int


def tensorrt_missing_reason() -> str | None:
    """None where TensorRT can be imported, else why the plan is not built."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed; the vision tower runs on ONNX Runtime or PyTorch"
    return None


def patch_profile(cfg: VisionConfig) -> PatchProfile:
    """Patch counts of the profile: one smallest image .. the per-call cap of the ONNX graph."""
    pre, area = cfg.preprocessing, cfg.patch_size ** 2
    smallest = max(cfg.merge_unit, pre["min_pixels"] // area // cfg.merge_unit * cfg.merge_unit)
    largest = max(smallest, min(MAX_PATCHES_PER_ONNX_CALL, pre["max_pixels"] // area))
    return PatchProfile(smallest, min(max(OPT_PATCHES, smallest), largest), largest)


def shape_ranges(cfg: VisionConfig, profile: PatchProfile) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every ONNX input for `profile`."""
    unit = cfg.merge_unit
    ranges = {
        "pixel_values": tuple((n, cfg.patch_dim) for n in (profile.min, profile.opt, profile.max)),
        "position_ids": tuple((n, 2) for n in (profile.min, profile.opt, profile.max)),
        # one segment per frame; a frame holds at least one merge unit of patches
        "cu_seqlens": ((2,), (2,), (profile.max // unit + 1,)),
    }
    if cfg.uses_windows:
        merged = tuple(n // unit for n in (profile.min, profile.opt, profile.max))
        ranges["window_index"] = tuple((m,) for m in merged)
        ranges["cu_window_seqlens"] = ((2,), (merged[1] + 1,), (merged[2] + 1,))
    return ranges


def build_vision_plan(onnx_path: Path, plan_path: Path, cfg: VisionConfig, dtype: str) -> PatchProfile:
    """Build and save the plan; raises whatever TensorRT raises (the caller records it)."""
    from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path, save_engine

    profile = patch_profile(cfg)
    trt_profile = Profile()
    for name, (low, opt, high) in shape_ranges(cfg, profile).items():
        trt_profile.add(name, min=low, opt=opt, max=high)
    config = CreateConfig(fp16=dtype == "float16", bf16=dtype == "bfloat16", profiles=[trt_profile])
    engine = engine_from_network(network_from_onnx_path(str(onnx_path)), config=config)
    save_engine(engine, str(plan_path))
    return profile
