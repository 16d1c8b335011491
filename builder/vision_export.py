"""Export the vision tower to `vision/encoder.onnx` with a dynamic patch count.

What it is for: the ONNX graph every non-PyTorch vision backend runs (ONNX
Runtime here, TensorRT where installed), for any family (docs/design/families.md).
The exported module is the family's `forward` with `segmented=False` (REFERENCE.md
section 4): its host-computed inputs (`encoder_feed`, named by `onnx_inputs`) come
in as graph inputs, so one graph serves any number of images (Qwen2-VL: positions
and segment boundaries in, the block-diagonal mask built in the graph, one SDPA call). The TorchScript exporter (`dynamo=False`) is used: the
dynamo exporter specialises or fails on this graph. Towers whose float32
weights would pass protobuf's 2 GB limit are written with external data
(`encoder.onnx` + `encoder.onnx.data`).
Not for: checking the export against PyTorch (builder/validate_vision.py).
"""
from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine_format.vision_config import VisionConfig
from runtime.families import vision_family
from runtime.families.base import OUTPUT_NAME, Grid, VisionFamily

ONNX_FILE = "encoder.onnx"
ONNX_DATA_FILE = "encoder.onnx.data"
OPSET = 17
EXTERNAL_DATA_BYTES = 1 << 30     # above this many weight bytes the weights go to ONNX_DATA_FILE


class VisionExportError(RuntimeError):
    """The ONNX export of the vision tower failed; the message names the step."""


@dataclass(frozen=True, slots=True)
class ExportedVision:
    onnx: str                  # relative to the engine directory
    onnx_data: str | None      # external weights file, when the tower is large
    export_grids: tuple[Grid, ...]


class VisionTowerModule(torch.nn.Module):
    """The family's `forward` with the weights as float32 buffers, for tracing (segmented=False);
    positional inputs in `onnx_inputs()` order."""

    def __init__(self, family: VisionFamily, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.family = family
        self.input_names = tuple(i.name for i in family.onnx_inputs())
        self.names = sorted(weights)
        for i, name in enumerate(self.names):
            self.register_buffer(f"w{i}", weights[name].to(torch.float32).contiguous(), persistent=True)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        weights = {name: getattr(self, f"w{i}") for i, name in enumerate(self.names)}
        return self.family.forward(weights, dict(zip(self.input_names, inputs, strict=True)), segmented=False)


def input_names(cfg: VisionConfig) -> tuple[str, ...]:
    return tuple(i.name for i in vision_family(cfg).onnx_inputs())


def example_inputs(cfg: VisionConfig, grids: tuple[Grid, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    """Feed dict (ONNX input name -> tensor) for `grids`, pixel values from a seeded generator."""
    family = vision_family(cfg)
    return family.encoder_feed(family.random_pixels(grids, torch.Generator().manual_seed(seed)), grids)


def save_onnx(model: Any, target: Path, data_file: str | None) -> None:
    """Write an ONNX model to `target`, its tensors in one file `data_file` beside it when given (a graph over
    2 GiB needs it), then run ONNX's checker on what was written."""
    import onnx

    if data_file is not None:
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_file, size_threshold=0)
    else:
        onnx.save_model(model, str(target))
    onnx.checker.check_model(str(target))


def export_vision_onnx(vision_dir: Path, cfg: VisionConfig, weights: dict[str, torch.Tensor],
                       engine_root: Path, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> ExportedVision:
    """Write vision_dir/encoder.onnx (and encoder.onnx.data for large towers); returns relative paths."""
    import onnx

    family = vision_family(cfg)
    module = VisionTowerModule(family, weights).eval()
    grids = family.export_grids
    feed = example_inputs(cfg, grids)
    names = input_names(cfg)
    dynamic = {i.name: {axis: dim for axis, dim in enumerate(i.dims) if isinstance(dim, str)}
               for i in family.onnx_inputs()}
    dynamic[OUTPUT_NAME] = {0: "num_merged_tokens"}      # the embedding rows
    weight_bytes = sum(t.numel() * 4 for t in module.buffers())
    external = weight_bytes > external_data_bytes
    scratch = Path(tempfile.mkdtemp(prefix=".onnx-export.", dir=vision_dir))
    try:
        traced_path = scratch / ONNX_FILE
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")     # TorchScript exporter deprecation / tracer warnings
            torch.onnx.export(module, tuple(feed[n] for n in names), str(traced_path), input_names=list(names),
                              output_names=[OUTPUT_NAME], dynamic_axes={n: dynamic[n] for n in (*names, OUTPUT_NAME)},
                              opset_version=OPSET, do_constant_folding=True, dynamo=False)
        save_onnx(onnx.load(str(traced_path), load_external_data=True), vision_dir / ONNX_FILE,
                  ONNX_DATA_FILE if external else None)
    except Exception as exc:
        raise VisionExportError(f"ONNX export of the {cfg.model_type} vision tower failed: "
                                f"{exc.__class__.__name__}: {exc}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rel = lambda name: (vision_dir / name).relative_to(engine_root).as_posix()   # noqa: E731
    return ExportedVision(rel(ONNX_FILE), rel(ONNX_DATA_FILE) if external else None, grids)
