"""The Qwen2-VL / Qwen2.5-VL family: its `VisionFamily` for the runtime (docs/design/families.md).

What it is for: binding the family's parts to one engine's `vision/config.json`:
preprocessing (preprocess.py, bit-identical to HF), the prompt's placeholders
(`<|vision_start|><|image_pad|><|vision_end|>`, the pad token repeated once per
merged patch), M-RoPE positions (the shared runtime/multimodal/mrope.py), the
tower's host-side inputs (tower_inputs.py) and the tower itself (tower.py),
which is also the graph exported to ONNX.
Not for: the family's file schema (engine_format/families/qwen2_vl.py) or its
HF checkpoint mapping (builder/families/qwen2_vl.py).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from engine_format.families.qwen2_vl import QwenVisionConfig
from runtime.errors import FieldError
from runtime.families.base import Expansion, Grid, OnnxInput, PromptFormat
from runtime.families.qwen2_vl.preprocess import PreprocessConfig, preprocess_image, preprocess_video
from runtime.families.qwen2_vl.tower import vision_forward
from runtime.families.qwen2_vl.tower_inputs import num_patches, vision_inputs
from runtime.multimodal.image_processing import ProcessedVisual
from runtime.multimodal.mrope import MRopeSpec, mrope_positions

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
PLACEHOLDERS = {"image": IMAGE_PAD, "video": VIDEO_PAD}
# Two images of different sizes: the trace sees several segments (and windows for Qwen2.5-VL).
EXPORT_GRIDS: tuple[Grid, ...] = ((1, 4, 6), (1, 8, 8))
WINDOW_INPUTS = ("window_index", "cu_window_seqlens")
# The ONNX graph attends through one block-diagonal [N, N] mask over all the patches of a call, so the
# attention of a call grows with the square of its patches: ONNX Runtime packs visuals into one call only
# while they stay this small (saving the per-call cost of small images); larger ones run one per call.
# Measured on tiny-qwen2-vl (ORT CPU, 1 thread): one 256-patch image 2.0 ms, 16 of them in one call
# 1292 ms against 16 calls 75 ms; 64 patches 0.56 ms, 16 patches 0.35 ms (issue 13).
ONNX_GROUP_PATCHES = 256
# So "auto" runs the PyTorch tower on the CPU, which batches a step's same-size images in one call
# (tower.segment_attention). 16 requests of one 224x224 image each, in-process, 1 thread, interleaved under
# load 8: encoder CPU 26-32 ms vs ONNX Runtime's 48-61 ms, first token after 145-191 vs 282-324 ms; served
# c=16 (64 requests): 894 / 1115 vs 524 / 464 tok/s, TTFT p50 246 / 290 vs 383 / 393 ms (issue 13).
CPU_VISION_BACKEND = "pytorch"


class Qwen2VLFamily:
    """`VisionFamily` of Qwen2-VL and Qwen2.5-VL engines."""

    def __init__(self, config: QwenVisionConfig) -> None:
        self.config = config
        self.preprocess_config = PreprocessConfig.from_dict(config.preprocessing)
        pads = {"image": config.image_token_id, "video": config.video_token_id}
        self.prompt = PromptFormat(
            kinds=("image", "video"), placeholder_ids=pads, placeholder_texts=dict(PLACEHOLDERS),
            default_blocks={kind: VISION_START + text + VISION_END for kind, text in PLACEHOLDERS.items()},
            embed_ids=pads)
        self.mrope = MRopeSpec(config.image_token_id, config.video_token_id, config.vision_start_token_id,
                               config.spatial_merge_size, float(config.tokens_per_second or 0), config.model_type)
        self.video_frame_multiple = self.preprocess_config.temporal_patch_size
        self.max_patches_per_onnx_call = ONNX_GROUP_PATCHES
        self.cpu_vision_backend = CPU_VISION_BACKEND
        self.export_grids = EXPORT_GRIDS

    # ------------------------------------------------------------------ prompt side

    def preprocess_image(self, image: Image.Image, field: str) -> ProcessedVisual:
        return preprocess_image(image, self.preprocess_config, field=field)

    def preprocess_video(self, frames: Sequence[Image.Image], fps: float, field: str) -> tuple[ProcessedVisual, ...]:
        return (preprocess_video(frames, self.preprocess_config, fps, field=field),)

    def expand(self, kind: str, visuals: Sequence[ProcessedVisual],
               tokenize: Callable[[str], list[int]]) -> Expansion:
        """The one pad token becomes one pad per merged patch (the begin / end tokens are already there)."""
        (visual,) = visuals
        return Expansion((self.prompt.embed_ids[kind],) * visual.num_tokens, ((0, visual.num_tokens),))

    def positions(self, token_ids: Sequence[int], visuals: Sequence[ProcessedVisual]) -> tuple[np.ndarray | None, int]:
        return mrope_positions(token_ids, visuals, self.mrope)

    # ----------------------------------------------------------------- encoder side

    def encoder_feed(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> dict[str, torch.Tensor]:
        cfg = self.config
        want = (num_patches(grids), cfg.patch_dim)
        if pixel_values.dim() != 2 or tuple(pixel_values.shape) != want:
            raise FieldError("pixel_values", f"expected shape {list(want)} for grids {list(grids)}, "
                             f"got {list(pixel_values.shape)}")
        if not pixel_values.is_floating_point():
            raise FieldError("pixel_values", f"expected a floating-point tensor, got {pixel_values.dtype}")
        inputs = vision_inputs(grids, cfg)
        feed = {"pixel_values": pixel_values, "position_ids": inputs.position_ids, "cu_seqlens": inputs.cu_seqlens}
        if inputs.window_index is not None and inputs.cu_window_seqlens is not None:
            feed.update(window_index=inputs.window_index, cu_window_seqlens=inputs.cu_window_seqlens)
        return feed

    def forward(self, weights: dict[str, torch.Tensor], feed: dict[str, torch.Tensor], segmented: bool) -> torch.Tensor:
        return vision_forward(self.config, weights, feed["pixel_values"], feed["position_ids"], feed["cu_seqlens"],
                              feed.get("window_index"), feed.get("cu_window_seqlens"), segmented=segmented)

    def onnx_inputs(self) -> tuple[OnnxInput, ...]:
        inputs = (OnnxInput("pixel_values", np.float32, ("num_patches", self.config.patch_dim)),
                  OnnxInput("position_ids", np.int64, ("num_patches", 2)),
                  OnnxInput("cu_seqlens", np.int32, ("num_segments_plus_1",)))
        if not self.config.uses_windows:
            return inputs
        return inputs + (OnnxInput("window_index", np.int64, ("num_merged_tokens",)),
                         OnnxInput("cu_window_seqlens", np.int32, ("num_windows_plus_1",)))

    def random_pixels(self, grids: Sequence[Grid], generator: torch.Generator) -> torch.Tensor:
        return torch.randn(num_patches(grids), self.config.patch_dim, generator=generator)

    def profile_grids(self, max_patches: int) -> list[Grid]:
        """One square image of (nearly) max_patches patches."""
        merge = self.config.spatial_merge_size
        side = max(merge, math.isqrt(max_patches) // merge * merge)
        return [(1, side, side)]
