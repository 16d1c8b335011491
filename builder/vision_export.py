"""Export the vision tower to `vision/encoder.onnx` with a dynamic patch count.

What it is for: the ONNX graph every non-PyTorch vision backend runs (ONNX
Runtime here, TensorRT where installed). The exported module is
`runtime.vision.vision_model.vision_forward` with `segmented=False` (REFERENCE.md
section 4): host-computed positions and segment boundaries come in as inputs,
the block-diagonal mask is built in the graph, and one SDPA call serves any
number of images. The TorchScript exporter (`dynamo=False`) is used: the
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

import torch

from engine_format.vision_config import VisionConfig
from runtime.vision.vision_inputs import GridTHW, vision_inputs
from runtime.vision.vision_model import vision_forward

ONNX_FILE = "encoder.onnx"
ONNX_DATA_FILE = "encoder.onnx.data"
OPSET = 17
EXTERNAL_DATA_BYTES = 1 << 30     # above this many weight bytes the weights go to ONNX_DATA_FILE
# Two images of different sizes: the trace sees several segments (and windows for Qwen2.5-VL).
EXPORT_GRIDS: tuple[GridTHW, ...] = ((1, 4, 6), (1, 8, 8))
INPUT_NAMES = ("pixel_values", "position_ids", "cu_seqlens", "window_index", "cu_window_seqlens")
OUTPUT_NAME = "image_embeds"


class VisionExportError(RuntimeError):
    """The ONNX export of the vision tower failed; the message names the step."""


@dataclass(frozen=True, slots=True)
class ExportedVision:
    onnx: str                  # relative to the engine directory
    onnx_data: str | None      # external weights file, when the tower is large
    export_grids: tuple[GridTHW, ...]


class VisionTowerModule(torch.nn.Module):
    """`vision_forward` with the weights as float32 buffers, for tracing; the mask path (segmented=False)."""

    def __init__(self, cfg: VisionConfig, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.cfg = cfg
        self.names = sorted(weights)
        for i, name in enumerate(self.names):
            self.register_buffer(f"w{i}", weights[name].to(torch.float32).contiguous(), persistent=True)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                window_index: torch.Tensor | None = None,
                cu_window_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        weights = {name: getattr(self, f"w{i}") for i, name in enumerate(self.names)}
        return vision_forward(self.cfg, weights, pixel_values, position_ids, cu_seqlens, window_index,
                              cu_window_seqlens, segmented=False)


def input_names(cfg: VisionConfig) -> tuple[str, ...]:
    return INPUT_NAMES if cfg.uses_windows else INPUT_NAMES[:3]


def example_inputs(cfg: VisionConfig, grids: tuple[GridTHW, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    """Feed dict (ONNX input name -> tensor) for `grids`, pixel values drawn from a seeded normal."""
    inputs = vision_inputs(grids, cfg)
    generator = torch.Generator().manual_seed(seed)
    feed = {"pixel_values": torch.randn(inputs.num_patches, cfg.patch_dim, generator=generator),
            "position_ids": inputs.position_ids, "cu_seqlens": inputs.cu_seqlens}
    if cfg.uses_windows:
        feed.update(window_index=inputs.window_index, cu_window_seqlens=inputs.cu_window_seqlens)
    return feed


def export_vision_onnx(vision_dir: Path, cfg: VisionConfig, weights: dict[str, torch.Tensor],
                       engine_root: Path, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> ExportedVision:
    """Write vision_dir/encoder.onnx (and encoder.onnx.data for large towers); returns relative paths."""
    import onnx

    module = VisionTowerModule(cfg, weights).eval()
    feed = example_inputs(cfg, EXPORT_GRIDS)
    names = input_names(cfg)
    dynamic = {"pixel_values": {0: "num_patches"}, "position_ids": {0: "num_patches"},
               "cu_seqlens": {0: "num_segments_plus_1"}, "window_index": {0: "num_merged_tokens"},
               "cu_window_seqlens": {0: "num_windows_plus_1"}, OUTPUT_NAME: {0: "num_merged_tokens"}}
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
        model = onnx.load(str(traced_path), load_external_data=True)
        target = vision_dir / ONNX_FILE
        if external:
            onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=ONNX_DATA_FILE, size_threshold=0)
        else:
            onnx.save_model(model, str(target))
        onnx.checker.check_model(str(target))
    except Exception as exc:
        raise VisionExportError(f"ONNX export of the {cfg.model_type} vision tower failed: "
                                f"{exc.__class__.__name__}: {exc}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rel = lambda name: (vision_dir / name).relative_to(engine_root).as_posix()   # noqa: E731
    return ExportedVision(rel(ONNX_FILE), rel(ONNX_DATA_FILE) if external else None, EXPORT_GRIDS)
