"""The LLaVA-1.5 / LLaVA-NeXT runtime family (docs/design/families.md): images in, CLIP rows out.

What it is for: `LlavaFamily`, the `VisionFamily` of engines whose
vision/config.json model_type is `llava` or `llava_next`. A visual is one image:
`pixel_values [crops, 3, S, S]` (runtime/families/llava/preprocess.py),
`grid_thw = (crops, S/p, S/p)` for 1.5 and `(crops, S/p, S/p, height, width,
rows, columns)` for NeXT (the original size and the anyres grid, which decide the
unpadding), `num_embeds` the LLM rows. One `<image>` in the rendered prompt
expands to `<image>` x num_tokens as HF's LlavaProcessor / LlavaNextProcessor do;
the LLM is 1-D RoPE. The tower feed is `pixel_values` plus `gather_index`, the
host-computed order of the rows (runtime/families/llava/geometry.py), so the
exported graph is static.
Not for: the tower's arithmetic (tower.py), the anyres rules (geometry.py) or pixels (preprocess.py).
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from engine_format.families.llava import LlavaVisionConfig
from engine_format.vision_config import MAX_PATCHES_PER_ONNX_CALL
from runtime.errors import FieldError
from runtime.families.base import Expansion, Grid, OnnxInput, PromptFormat
from runtime.families.llava.geometry import crop_grid, gather_index, num_image_tokens
from runtime.families.llava.preprocess import LlavaPreprocessConfig, preprocess_llava
from runtime.families.llava.tower import encode_rows
from runtime.multimodal.image_processing import ProcessedVisual, content_hash

IMAGE_TEXT = "<image>"


class LlavaFamily:
    """VisionFamily for `llava` / `llava_next` engines."""

    video_frame_multiple = 1
    max_patches_per_onnx_call = MAX_PATCHES_PER_ONNX_CALL
    cpu_vision_backend = "onnxruntime"          # the graph batches tiles itself (no [N, N] mask)

    def __init__(self, config: LlavaVisionConfig) -> None:
        self.config = config
        self.preprocess = LlavaPreprocessConfig.from_dict(config.preprocessing)
        image_id = config.image_token_id
        self.prompt = PromptFormat(kinds=("image",), placeholder_ids={"image": image_id},
                                   placeholder_texts={"image": IMAGE_TEXT}, default_blocks={"image": IMAGE_TEXT + "\n"},
                                   embed_ids={"image": image_id})
        side = config.image_size
        self.export_grids = (self.grid_of(side, side), self.grid_of(2 * side, side))

    # ------------------------------------------------------------------ prompts

    def preprocess_image(self, image: Image.Image, field: str) -> ProcessedVisual:
        pixels = preprocess_llava(image, self.preprocess, field)
        grid = self.grid_of(image.height, image.width)
        return ProcessedVisual(kind="image", pixel_values=pixels, grid_thw=grid, second_per_grid_t=0.0,
                               content_hash=content_hash("image", grid, 0.0, pixels), merge_size=1,
                               num_embeds=num_image_tokens(self.config, image.height, image.width))

    def preprocess_video(self, frames: Sequence[Image.Image], fps: float, field: str) -> tuple[ProcessedVisual, ...]:
        raise FieldError(field, f"{self.config.model_type} engines take images only, not video")

    def expand(self, kind: str, visuals: Sequence[ProcessedVisual],
               tokenize: Callable[[str], list[int]]) -> Expansion:
        if kind != "image" or len(visuals) != 1:
            raise ValueError(f"one <image> placeholder stands for one image, got {len(visuals)} {kind} visuals")
        n = visuals[0].num_tokens
        return Expansion(token_ids=(self.config.image_token_id,) * n, spans=((0, n),))

    def positions(self, token_ids: Sequence[int], visuals: Sequence[ProcessedVisual]) -> tuple[np.ndarray | None, int]:
        return None, 0

    # ------------------------------------------------------------------ the tower

    def encoder_feed(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> dict[str, torch.Tensor]:
        cfg, side = self.config, self.config.image_size
        total = sum(g[0] for g in grids)
        want = (total, cfg.num_channels, side, side)
        if tuple(pixel_values.shape) != want or not pixel_values.is_floating_point():
            raise FieldError("pixel_values", f"expected a float tensor of shape {list(want)} for grids "
                                             f"{list(grids)}, got {list(pixel_values.shape)} {pixel_values.dtype}")
        indices, first = [], 0
        for i, grid in enumerate(grids):
            self._check_grid(grid, i)
            rows, cols = (grid[5], grid[6]) if cfg.is_next else (0, 0)
            height, width = (grid[3], grid[4]) if cfg.is_next else (1, 1)
            indices.append(gather_index(cfg, height, width, rows, cols, first, total * cfg.tokens_per_crop))
            first += grid[0]
        return {"pixel_values": pixel_values, "gather_index": torch.from_numpy(np.concatenate(indices))}

    def forward(self, weights: dict[str, torch.Tensor], feed: dict[str, torch.Tensor], segmented: bool) -> torch.Tensor:
        return encode_rows(self.config, weights, feed["pixel_values"], feed["gather_index"])

    def onnx_inputs(self) -> tuple[OnnxInput, ...]:
        side, channels = self.config.image_size, self.config.num_channels
        return (OnnxInput("pixel_values", np.float32, ("num_crops", channels, side, side)),
                OnnxInput("gather_index", np.int64, ("num_rows",)))

    def random_pixels(self, grids: Sequence[Grid], generator: torch.Generator) -> torch.Tensor:
        side = self.config.image_size
        return torch.randn((sum(g[0] for g in grids), self.config.num_channels, side, side), generator=generator)

    def profile_grids(self, max_patches: int) -> list[Grid]:
        """As many of the largest images (the largest pinpoint's crops) as fit in max_patches, at least one."""
        if self.config.is_next:
            height, width = max(self.config.grid_pinpoints, key=lambda p: p[0] * p[1])
        else:
            height = width = self.config.image_size
        grid = self.grid_of(height, width)
        per_image = grid[0] * grid[1] * grid[2]
        return [grid] * max(1, max_patches // per_image)

    # ------------------------------------------------------------------ helpers

    def grid_of(self, height: int, width: int) -> Grid:
        """The grid of an image of height x width (see the module docstring)."""
        side = self.config.patches_per_side
        if not self.config.is_next:
            return (1, side, side)
        rows, cols = crop_grid(self.config, height, width)
        return (1 + rows * cols, side, side, height, width, rows, cols)

    def _check_grid(self, grid: Grid, i: int) -> None:
        """A grid this family made for some image (NeXT: its crops and rows / columns follow from its size)."""
        next_ = self.config.is_next
        values = tuple(int(x) for x in grid) if all(isinstance(x, numbers.Integral) for x in grid) else ()
        expected: Grid | None = None
        if len(values) == 7 and next_ and min(values[3:5]) > 0:
            expected = self.grid_of(values[3], values[4])
        elif len(values) == 3 and not next_:
            expected = self.grid_of(1, 1)
        if values != expected:
            shape = "(crops, S/p, S/p, height, width, rows, cols)" if next_ else str(list(self.grid_of(1, 1)))
            raise FieldError(f"grid_thw[{i}]", f"{list(grid)} is not a {self.config.model_type} image grid "
                                               f"(expected {shape})")
