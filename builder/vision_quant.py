"""`--vision-quant int8`: an int8 Q/DQ ONNX export of the vision tower, checked against the float tower.

What it is for: writing `vision/encoder.int8.onnx` beside the float `vision/encoder.onnx`
of a VL engine, and the polygraphy comparison of the two that goes into `validation.json`.

How: ONNX Runtime's static quantization (`onnxruntime.quantization.quantize_static`) in the
QDQ format: symmetric int8 weights per output channel and symmetric int8 activations per
tensor (zero points 0, the form TensorRT's explicit-precision int8 builds take), on every
Gemm and on every MatMul whose second input is a weight (`MatMulConstBOnly`: the attention
score / value products stay float), MinMax calibration. The calibration feeds are recorded
from the runtime's own ONNX Runtime encoder (runtime/vision/vision_encoder.py) running the
float graph on the calibration images after the runtime's own processor
(runtime/multimodal/processor.py): whatever inputs a family's graph takes (patches,
positions, segment boundaries, windows), the quantizer sees exactly what serving feeds it.
Why not NVIDIA Model Optimizer's ONNX PTQ (`modelopt.onnx.quantization`): it needs its
`[onnx]` extra, which on Linux x86-64 pins `onnxruntime-gpu~=1.24.2`, `onnx~=1.21` and
`cupy-cuda12x` (0.47's metadata); the project's CPU stack has onnx 1.23 and the CPU
onnxruntime 1.32, and the extra cannot be installed beside them. ONNX Runtime's quantizer is
already a dependency, runs on the CPU in well under a second on the tiny towers, and writes
the same Q/DQ form.

The comparison: polygraphy's Comparator runs ONNX Runtime (the runtime's session options:
Q/DQ nodes kept unfused, REFERENCE.md section 4) on both graphs over images the calibration
did not see (several per call), and the pair passes when max |int8 - float| over
max(1, max |float|) stays within `INT8_TOLERANCE`; the build fails outside it.
Not for: the float export (builder/vision_export.py) or the float tower's parity (builder/validate_vision.py).
"""
from __future__ import annotations

import shutil
import tempfile
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from builder.calib_data import QuantizeError
from builder.calib_images import generated_image

if TYPE_CHECKING:
    from engine_format.engine_dir import LoadedEngine
    from runtime.multimodal.image_processing import ProcessedVisual

VISION_QUANT_MODES = ("int8",)
INT8_ONNX_FILE = "encoder.int8.onnx"
INT8_ONNX_DATA_FILE = "encoder.int8.onnx.data"
INT8_PAIR = "onnxruntime_int8_vs_onnxruntime"
# max |int8 - float| / max(1, max |float|) over the held-out images. Measured on the tiny random towers
# (MinMax, per-channel weights, bundled images): 0.037 on tiny-qwen2.5-vl, 0.077 on tiny-qwen2-vl, 0.10 on
# tiny-qwen2-vl-h128; 0.2 leaves 2x. A broken graph lands outside: the projector's weight scales doubled give
# 0.49 (tests/builder/test_vl_quant.py).
INT8_TOLERANCE = 0.2
HELD_OUT_SEED = 7_001          # held-out validation images: a seed the bundled calibration set does not use
HELD_OUT_GROUPS = ((0,), (1, 2), (3,), (4, 5))      # images per encoder call in the comparison
MAX_CALIB_IMAGES = 64


@dataclass(frozen=True, slots=True)
class VisionQuantResult:
    onnx: str                      # relative to the engine directory
    onnx_data: str | None
    manifest: dict[str, Any] = field(default_factory=dict)


def check_vision_quant(mode: str | None, vision_language: bool) -> None:
    """Checks that need no model (before any work); QuantizeError naming the flag."""
    if mode is None:
        return
    if mode not in VISION_QUANT_MODES:
        raise QuantizeError(f"--vision-quant: unknown mode {mode!r} (choose from {', '.join(VISION_QUANT_MODES)})")
    if not vision_language:
        raise QuantizeError("--vision-quant: the model is a text model (no vision tower to quantize)")


class _RecordingSession:
    """Wraps an ONNX Runtime session: every feed dict run through it is kept (copied) in `feeds`."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.feeds: list[dict[str, np.ndarray]] = []

    def run(self, output_names: Any, feed: dict[str, np.ndarray]) -> Any:
        self.feeds.append({name: np.array(value, copy=True) for name, value in feed.items()})
        return self.session.run(output_names, feed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def processed_visuals(engine: LoadedEngine, images: list[Image.Image]) -> list[ProcessedVisual]:
    """Each image through the runtime's processor, as a one-image chat prompt would send it."""
    from transformers import AutoTokenizer

    from runtime.multimodal.image_io import ImageLimits
    from runtime.multimodal.processor import MultimodalProcessor

    processor = MultimodalProcessor(engine, AutoTokenizer.from_pretrained(str(engine.tokenizer_dir)), ImageLimits())
    visuals = []
    for image in images:
        _, inputs = processor.process_chat([{"role": "user", "content": [{"type": "image", "image": image},
                                                                         {"type": "text", "text": "?"}]}])
        visuals.extend(inputs.visuals)
    return visuals


def recorded_feeds(engine: LoadedEngine, onnx_path: Path, groups: list[list[ProcessedVisual]]
                   ) -> list[dict[str, np.ndarray]]:
    """The ONNX feed dicts the runtime's encoder makes for each group of visuals (one call per group)."""
    from runtime.vision.vision_encoder import OnnxVisionEncoder

    assert engine.vision is not None
    encoder = OnnxVisionEncoder(str(onnx_path), engine.vision.config)
    recorder = _RecordingSession(encoder.session)
    encoder.session = recorder
    for group in groups:
        pixels = torch.from_numpy(np.concatenate([v.pixel_values for v in group], axis=0))
        encoder.encode(pixels, [v.grid_thw for v in group])
    return recorder.feeds


def quantize_vision_onnx(engine: LoadedEngine, images: list[Image.Image]) -> VisionQuantResult:
    """Write vision/encoder.int8.onnx (calibrated on `images`) into the engine directory `engine.root`."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    from builder.vision_export import save_onnx

    assert engine.vision is not None
    if not images:
        raise QuantizeError("--vision-quant: the calibration data holds no images (add \"image\" entries to "
                            "--calib-data, or leave it out to use the bundled images)")
    images = images[:MAX_CALIB_IMAGES]
    float_path = engine.vision.onnx_path
    vision_dir = float_path.parent
    feeds = recorded_feeds(engine, float_path, [[v] for v in processed_visuals(engine, images)])

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.remaining = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.remaining, None)

    external = (vision_dir / f"{float_path.name}.data").is_file()
    scratch = Path(tempfile.mkdtemp(prefix=".int8-export.", dir=vision_dir))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(str(float_path), str(scratch / INT8_ONNX_FILE), Reader(), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["Gemm", "MatMul"], per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external,
                            extra_options={"MatMulConstBOnly": True, "ActivationSymmetric": True,
                                           "WeightSymmetric": True})
        save_onnx(onnx.load(str(scratch / INT8_ONNX_FILE), load_external_data=True), vision_dir / INT8_ONNX_FILE,
                  INT8_ONNX_DATA_FILE if external else None)
    except QuantizeError:
        raise
    except Exception as exc:
        raise QuantizeError(f"--vision-quant int8: ONNX Runtime's quantization of {float_path.name} failed: "
                            f"{exc.__class__.__name__}: {exc}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    root = engine.root.resolve()
    rel = lambda name: (vision_dir / name).resolve().relative_to(root).as_posix()   # noqa: E731
    counts = _qdq_counts(vision_dir / INT8_ONNX_FILE)
    manifest = {
        "mode": "int8", "format": "ONNX Q/DQ (QuantizeLinear / DequantizeLinear), opset of the float graph",
        "file": rel(INT8_ONNX_FILE),
        "tool": f"onnxruntime {onnxruntime.__version__} quantize_static",
        "weights": "int8, symmetric, per output channel", "activations": "int8, symmetric, per tensor (MinMax)",
        "quantized_ops": "Gemm, MatMul with a weight operand (attention products stay float)",
        "num_quantize_linear": counts[0], "num_dequantize_linear": counts[1],
        "calibration": {"num_images": len(images), "num_patches": int(sum(f[next(iter(f))].shape[0] for f in feeds))},
        "runtime": "the onnxruntime vision backend loads this graph instead of encoder.onnx (Q/DQ kept unfused "
                   "on the CPU); the pytorch backend stays float",
    }
    return VisionQuantResult(rel(INT8_ONNX_FILE), rel(INT8_ONNX_DATA_FILE) if external else None, manifest)


def _qdq_counts(path: Path) -> tuple[int, int]:
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    return (sum(n.op_type == "QuantizeLinear" for n in nodes), sum(n.op_type == "DequantizeLinear" for n in nodes))


def held_out_images(count: int = 6) -> list[Image.Image]:
    return [generated_image(i, seed=HELD_OUT_SEED) for i in range(count)]


def validate_vision_int8(engine: LoadedEngine, int8_path: Path) -> dict[str, Any]:
    """polygraphy Comparator: ONNX Runtime on the float and the int8 graph over held-out images."""
    import onnxruntime
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    from builder.validate_vision import _simple_compare
    from runtime.vision.vision_encoder import session_options

    assert engine.vision is not None
    visuals = processed_visuals(engine, held_out_images(1 + max(max(g) for g in HELD_OUT_GROUPS)))
    feeds = [OrderedDict(f) for f in recorded_feeds(engine, engine.vision.onnx_path,
                                                     [[visuals[i] for i in group] for group in HELD_OUT_GROUPS])]
    session = lambda path: (lambda: onnxruntime.InferenceSession(   # noqa: E731
        str(path), session_options(), providers=["CPUExecutionProvider"]))
    runners = [OnnxrtRunner(session(engine.vision.onnx_path), name="onnxruntime"),
               OnnxrtRunner(session(int8_path), name="onnxruntime_int8")]
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        results = Comparator.run(runners, data_loader=feeds)
        outputs_float = [next(iter(out.values())) for out in results[0][1]]
        scale = max(1.0, max(float(np.abs(o).max()) for o in outputs_float))
        accuracy = Comparator.compare_accuracy(results, comparisons=[(1, 0)],
                                               compare_func=_simple_compare(atol=INT8_TOLERANCE * scale))
    if hasattr(accuracy, "lst"):
        accuracy = accuracy[0]
    per_iteration = accuracy[("onnxruntime_int8", "onnxruntime")]
    max_abs = max(float(next(iter(it.values())).max_absdiff) for it in per_iteration)
    mean_abs = float(np.mean([float(next(iter(it.values())).mean_absdiff) for it in per_iteration]))
    return {"max_abs_err": max_abs, "max_rel_err": max_abs / scale, "mean_abs_err": mean_abs, "scale": scale,
            "tolerance": {"max_abs_err_over_scale": INT8_TOLERANCE},
            "images": f"{len(visuals)} held-out generated images (seed {HELD_OUT_SEED}), calls of "
                      f"{[len(g) for g in HELD_OUT_GROUPS]} images",
            "passed": all(bool(next(iter(it.values()))) for it in per_iteration)}


def add_int8_pair(report: dict[str, Any], pair: dict[str, Any]) -> dict[str, Any]:
    """The validation report with the int8 pair in its `vision.pairs` (the build's `passed` needs it)."""
    vision = {**report["vision"], "pairs": {**report["vision"]["pairs"], INT8_PAIR: pair}}
    vision["passed"] = bool(vision["passed"] and pair["passed"])
    return {**report, "vision": vision, "passed": bool(report["passed"] and pair["passed"])}
