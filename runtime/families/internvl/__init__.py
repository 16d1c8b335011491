"""The InternVL2.5 family: its `VisionFamily` for the runtime (docs/design/families.md).

What it is for: binding the family's parts to one engine's `vision/config.json`:
dynamic tiling (preprocess.py, bit-identical to HF's processor), the prompt's
placeholders as transformers' InternVL processor writes them (the chat template
renders `<IMG_CONTEXT>` per image, which becomes `<img>` + `<IMG_CONTEXT>` x
tokens + `</img>`; `<video>` becomes one `Frame{i}: <img>...</img>` line per
frame, each frame its own visual), plain 1-D positions (the LLM is a Qwen2 /
Llama with ordinary RoPE) and the tower (tower.py: InternViT, pixel shuffle,
MLP projector), which is also the graph exported to ONNX (one input: the tiles).
Not for: the family's file schema (engine_format/families/internvl.py) or its
HF checkpoint mapping (builder/families/internvl.py).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from engine_format.families.internvl import InternVLVisionConfig
from runtime.errors import FieldError
from runtime.families.base import Expansion, Grid, OnnxInput, PromptFormat
from runtime.families.internvl.preprocess import TilingConfig, preprocess_frames, preprocess_tiled_image
from runtime.families.internvl.tower import internvl_forward
from runtime.multimodal.image_processing import ProcessedVisual

IMG_CONTEXT, VIDEO = "<IMG_CONTEXT>", "<video>"


class InternVLFamily:
    """`VisionFamily` of InternVL2.5 engines (InternViT-300M / -6B-shaped towers without QK norm)."""

    def __init__(self, config: InternVLVisionConfig) -> None:
        self.config = config
        self.tiling = TilingConfig.from_dict(config.preprocessing)
        ctx = config.image_token_id
        texts = {"image": IMG_CONTEXT, "video": VIDEO}
        placeholders = {"image": ctx}
        if config.video_token_id is not None:
            placeholders["video"] = config.video_token_id
        kinds = tuple(placeholders)
        self.prompt = PromptFormat(
            kinds=kinds, placeholder_ids=placeholders, placeholder_texts={k: texts[k] for k in kinds},
            default_blocks={k: texts[k] + "\n" for k in kinds}, embed_ids={k: ctx for k in kinds})
        self.video_frame_multiple = 1
        side = config.patches_per_side
        # No [N, N] mask in the graph (attention is per tile), so one call may take the largest image whole.
        self.max_patches_per_onnx_call = (self.tiling.max_tiles + 1) * config.patches_per_tile
        self.cpu_vision_backend = "onnxruntime"     # the graph batches tiles itself
        self.export_grids: tuple[Grid, ...] = ((2, side, side), (1, side, side))

    # ------------------------------------------------------------------ prompt side

    def preprocess_image(self, image: Image.Image, field: str) -> ProcessedVisual:
        return preprocess_tiled_image(image, self.tiling, field=field)

    def preprocess_video(self, frames: Sequence[Image.Image], fps: float, field: str) -> tuple[ProcessedVisual, ...]:
        if "video" not in self.prompt.kinds:
            raise FieldError(field, "this InternVL engine's tokenizer has no <video> token; send the frames as images")
        return preprocess_frames(frames, self.tiling, field=field)

    def expand(self, kind: str, visuals: Sequence[ProcessedVisual],
               tokenize: Callable[[str], list[int]]) -> Expansion:
        """image: `<img>` + context x n + `</img>`; video: `Frame{i}: <img>...</img>` lines joined by newlines."""
        cfg = self.config
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        for i, visual in enumerate(visuals):
            if kind == "video":
                ids.extend(tokenize(("\n" if i else "") + f"Frame{i + 1}: "))
            ids.append(cfg.image_start_token_id)
            spans.append((len(ids), visual.num_tokens))
            ids.extend([cfg.image_token_id] * visual.num_tokens)
            ids.append(cfg.image_end_token_id)
        return Expansion(tuple(ids), tuple(spans))

    def positions(self, token_ids: Sequence[int], visuals: Sequence[ProcessedVisual]) -> tuple[np.ndarray | None, int]:
        return None, 0

    # ----------------------------------------------------------------- encoder side

    def encoder_feed(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> dict[str, torch.Tensor]:
        cfg = self.config
        side = cfg.patches_per_side
        for i, grid in enumerate(grids):
            if tuple(grid[1:3]) != (side, side) or grid[0] < 1:
                raise FieldError(f"grid_thw[{i}]", f"expected (tiles >= 1, {side}, {side}), got {tuple(grid)}")
        want = (sum(g[0] for g in grids), cfg.num_channels, cfg.image_size, cfg.image_size)
        if tuple(pixel_values.shape) != want:
            raise FieldError("pixel_values", f"expected shape {list(want)} for grids {list(grids)}, "
                             f"got {list(pixel_values.shape)}")
        if not pixel_values.is_floating_point():
            raise FieldError("pixel_values", f"expected a floating-point tensor, got {pixel_values.dtype}")
        return {"pixel_values": pixel_values}

    def forward(self, weights: dict[str, torch.Tensor], feed: dict[str, torch.Tensor], segmented: bool) -> torch.Tensor:
        return internvl_forward(self.config, weights, feed["pixel_values"])

    def onnx_inputs(self) -> tuple[OnnxInput, ...]:
        size = self.config.image_size
        return (OnnxInput("pixel_values", np.float32, ("num_tiles", self.config.num_channels, size, size)),)

    def random_pixels(self, grids: Sequence[Grid], generator: torch.Generator) -> torch.Tensor:
        cfg = self.config
        return torch.randn(sum(g[0] for g in grids), cfg.num_channels, cfg.image_size, cfg.image_size,
                           generator=generator)

    def profile_grids(self, max_patches: int) -> list[Grid]:
        """As many whole tiles as fit max_patches (at least one), as one visual."""
        side = self.config.patches_per_side
        return [(max(1, max_patches // self.config.patches_per_tile), side, side)]
