"""Parity of the built vision tower: ONNX Runtime, our PyTorch tower and transformers' tower.

What it is for: the `vision` key of `validation.json`. polygraphy's Comparator
runs three runners over the same feed dicts (a data loader of a few grids, none
of them the grids the ONNX graph was traced on, including several images in one
call and a video): ONNX Runtime on `vision/encoder.onnx` (CPU, the runtime's
session options), our PyTorch tower on `vision/encoder.safetensors`, and HF's
tower built from the checkpoint's own tensors (rounded to the engine dtype, so
the comparison isolates the implementation and the conversion, not the dtype).
All run in float32. Errors are max |a - b| and that over max(1, max |HF|); a pair
passes when the latter is within its tolerance.
Not for: the LLM parity (builder/validate.py) or unit-test assertions.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner

from builder.families import build_family_for_vision
from builder.vision_export import example_inputs
from engine_format.engine_dir import LoadedEngine
from engine_format.vision_config import VisionConfig
from runtime.families import vision_family
from runtime.families.base import OUTPUT_NAME, Grid
from runtime.vision.vision_encoder import session_options

TOLERANCE = 1e-5                      # float32 everywhere: max |a - b| / max(1, max |HF|)
PAIRS = (("pytorch", "hf"), ("onnxruntime", "pytorch"), ("onnxruntime", "hf"))


class TowerRunner(BaseRunner):
    """A polygraphy runner over a PyTorch callable taking the feed dict as tensors."""

    def __init__(self, name: str, metadata: list[tuple[str, Any, tuple[int, ...]]], forward: Any) -> None:
        super().__init__(name=name)
        self.metadata = metadata
        self.forward = forward

    def get_input_metadata_impl(self) -> Any:
        from polygraphy.common import TensorMetadata

        meta = TensorMetadata()
        for name, dtype, shape in self.metadata:
            meta.add(name, dtype, shape)
        return meta

    @torch.inference_mode()
    def infer_impl(self, feed_dict: dict[str, Any]) -> OrderedDict:
        tensors = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in feed_dict.items()}
        start = time.perf_counter()
        out = self.forward(tensors)
        self.inference_time = time.perf_counter() - start
        return OrderedDict([(OUTPUT_NAME, out.float().numpy())])


def _ours(cfg: VisionConfig, weights: dict[str, torch.Tensor]) -> TowerRunner:
    family = vision_family(cfg)
    w32 = {name: t.float() for name, t in weights.items()}
    meta = [(i.name, i.dtype, tuple(-1 if isinstance(d, str) else d for d in i.dims)) for i in family.onnx_inputs()]
    return TowerRunner("pytorch", meta, lambda f: family.forward(w32, f, segmented=True))


def _hf(cfg: VisionConfig, hf_dir: Path) -> TowerRunner:
    tower = build_family_for_vision(cfg).hf_tower(hf_dir, cfg)
    return TowerRunner("hf", list(tower.inputs), tower.forward)


def _onnxruntime(onnx_path: Path) -> Any:
    import onnxruntime
    from polygraphy.backend.onnxrt import OnnxrtRunner

    return OnnxrtRunner(lambda: onnxruntime.InferenceSession(str(onnx_path), session_options(),
                                                             providers=["CPUExecutionProvider"]),
                        name="onnxruntime")


def data_loader(cfg: VisionConfig, grid_sets: tuple[tuple[Grid, ...], ...]) -> list[OrderedDict]:
    """One feed dict per grid set: every runner's inputs (each takes the ones it declares)."""
    feeds = []
    for i, grids in enumerate(grid_sets):
        feed = OrderedDict((name, t.numpy()) for name, t in example_inputs(cfg, grids, seed=i).items())
        feed["grid_thw"] = np.array(grids, dtype=np.int64)
        feeds.append(feed)
    return feeds


def validate_vision(engine: LoadedEngine, hf_dir: Path) -> dict[str, Any]:
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    assert engine.vision is not None, "validate_vision needs a VL engine"
    cfg = engine.vision.config
    grid_sets = build_family_for_vision(cfg).validation_grids
    if callable(grid_sets):     # grids that depend on the parsed config (LLaVA: crop side, anyres pinpoints)
        grid_sets = grid_sets(cfg)
    runners = [_onnxruntime(engine.vision.onnx_path), _ours(cfg, engine.vision.load_weights()), _hf(cfg, hf_dir)]
    index = {runner.name: i for i, runner in enumerate(runners)}
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        results = Comparator.run(runners, data_loader=data_loader(cfg, grid_sets))
        ref = [np.abs(out[OUTPUT_NAME]).max() for out in results[index["hf"]][1]]
        scale = max(1.0, float(max(ref)))
        accuracy = Comparator.compare_accuracy(
            results, comparisons=[(index[a], index[b]) for a, b in PAIRS],
            compare_func=_simple_compare(atol=TOLERANCE * scale))
    if hasattr(accuracy, "lst"):       # polygraphy >= 0.50: one AccuracyResult per compare function
        accuracy = accuracy[0]
    pairs: dict[str, Any] = {}
    for a, b in PAIRS:
        per_iteration = accuracy[(a, b)]
        max_abs = max(float(it[OUTPUT_NAME].max_absdiff) for it in per_iteration)
        pairs[f"{a}_vs_{b}"] = {"max_abs_err": max_abs, "max_rel_err": max_abs / scale,
                                "passed": all(bool(it[OUTPUT_NAME]) for it in per_iteration)}
    return {
        "reference": f"transformers {__import__('transformers').__version__} vision tower, float32, weights "
                     f"rounded to {cfg.dtype}; onnxruntime {__import__('onnxruntime').__version__} CPU",
        "comparator": f"polygraphy {__import__('polygraphy').__version__} Comparator",
        "grids": [[list(g) for g in grids] for grids in grid_sets],
        "num_patches": [int(sum(t * h * w for t, h, w, *_ in grids)) for grids in grid_sets],
        "scale": scale, "tolerance": {"max_abs_err_over_scale": TOLERANCE},
        "pairs": pairs, "passed": all(p["passed"] for p in pairs.values()),
    }


def _simple_compare(atol: float) -> Any:
    """Elementwise |a - b| <= atol (rtol 0); SimpleCompareFunc replaces CompareFunc.simple in polygraphy 0.53."""
    from polygraphy import comparator

    if hasattr(comparator, "SimpleCompareFunc"):
        return comparator.SimpleCompareFunc(atol=atol, rtol=0.0)
    return comparator.CompareFunc.simple(atol=atol, rtol=0.0)


def add_vision_report(llm_report: dict[str, Any], vision_report: dict[str, Any]) -> dict[str, Any]:
    return {**llm_report, "passed": bool(llm_report["passed"] and vision_report["passed"]), "vision": vision_report}


def vision_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The part of the vision report that goes into engine.json."""
    return {"passed": report["passed"],
            **{f"{name}_max_rel_err": pair["max_rel_err"] for name, pair in report["pairs"].items()}}


def vision_summary_line(report: dict[str, Any]) -> str:
    errs = ", ".join(f"{name} {pair['max_rel_err']:.1e}" for name, pair in report["pairs"].items())
    return f"vision tower rel err: {errs}; passed: {report['passed']}"
