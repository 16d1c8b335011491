"""What a vision-language family provides to the runtime (docs/design/families.md).

What it is for: the `VisionFamily` protocol, one instance per engine bound to its
parsed `vision/config.json`, through which generic code (the multimodal
processor, the admission check, the vision encoders, the memory profile and the
builder's ONNX export) does everything family-specific: preprocessing,
placeholder expansion, LLM positions, the tower's host-side inputs and its
forward pass. Also the small records those calls exchange.
Not for: any family's behaviour (runtime/families/<family>/) or the registry
(runtime/families/__init__.py).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from engine_format.vision_config import VisionConfig
from runtime.multimodal.image_processing import ProcessedVisual

OUTPUT_NAME = "image_embeds"      # the ONNX graph's one output: [rows, out_hidden_size] float32
Grid = tuple[int, ...]            # ProcessedVisual.grid_thw: (t, h, w) patches, then any family integers


@dataclass(frozen=True, slots=True)
class PromptFormat:
    """How visuals appear in a prompt."""

    kinds: tuple[str, ...]              # visual kinds the family accepts: ("image", "video") or ("image",)
    placeholder_ids: dict[str, int]     # kind -> the ONE token the rendered, tokenized prompt holds per visual
    placeholder_texts: dict[str, str]   # kind -> its text (process_text finds these; user text may not hold them)
    default_blocks: dict[str, str]      # kind -> text put first, per visual, when process_text's text has none
    embed_ids: dict[str, int]           # kind -> token id of the span rows (the rows embeddings replace)


@dataclass(frozen=True, slots=True)
class Expansion:
    """What replaces one placeholder token: ids, and where each visual's embedding rows go."""

    token_ids: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]  # (offset in token_ids, length) per visual, in order; every span token is
                                        # prompt.embed_ids[kind] and its length is the visual's num_tokens


@dataclass(frozen=True, slots=True)
class OnnxInput:
    """One named input of the tower (feed dict key, ONNX input name), in forward order."""

    name: str
    dtype: Any                          # numpy dtype
    dims: tuple[int | str, ...]         # a str names a dynamic axis


class VisionFamily(Protocol):
    """One family's runtime behaviour, bound to an engine's parsed `vision/config.json`."""

    @property
    def config(self) -> VisionConfig: ...

    @property
    def prompt(self) -> PromptFormat: ...

    @property
    def video_frame_multiple(self) -> int: ...       # decode_video keeps a multiple of this many frames

    @property
    def max_patches_per_onnx_call(self) -> int: ...  # ONNX Runtime groups visuals up to this many patches

    @property
    def cpu_vision_backend(self) -> str: ...         # what backend "auto" runs on the CPU (float towers)

    @property
    def export_grids(self) -> tuple[Grid, ...]: ...  # the grids the ONNX graph is traced on

    def preprocess_image(self, image: Image.Image, field: str) -> ProcessedVisual:
        """A decoded image -> one visual; FieldError(field, ...) on input the family cannot take."""
        ...

    def preprocess_video(self, frames: Sequence[Image.Image], fps: float, field: str) -> tuple[ProcessedVisual, ...]:
        """Sampled frames shown at `fps` -> the visuals of one video placeholder (one, or one per frame)."""
        ...

    def expand(self, kind: str, visuals: Sequence[ProcessedVisual],
               tokenize: Callable[[str], list[int]]) -> Expansion:
        """One placeholder token of `kind` with its visuals -> the tokens and spans that replace it."""
        ...

    def positions(self, token_ids: Sequence[int], visuals: Sequence[ProcessedVisual]) -> tuple[np.ndarray | None, int]:
        """M-RoPE: ([3, len] int64 positions, decode delta); 1-D RoPE: (None, 0).
        ValueError when the placeholder runs and the visuals disagree."""
        ...

    def encoder_feed(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> dict[str, torch.Tensor]:
        """Every input of `onnx_inputs()` for these visuals (concatenated along axis 0), computed on the host;
        FieldError("pixel_values" | "grid_thw[i]", ...) when they do not fit."""
        ...

    def forward(self, weights: dict[str, torch.Tensor], feed: dict[str, torch.Tensor], segmented: bool) -> torch.Tensor:
        """[sum num_tokens, out_hidden_size] in the weights' dtype, rows in the LLM's order.
        segmented=False: the exportable graph (no data-dependent Python control flow)."""
        ...

    def onnx_inputs(self) -> tuple[OnnxInput, ...]: ...

    def random_pixels(self, grids: Sequence[Grid], generator: torch.Generator) -> torch.Tensor:
        """pixel_values for these grids (export tracing, validation feeds, the memory profile)."""
        ...

    def profile_grids(self, max_patches: int) -> list[Grid]:
        """The grids of the largest encoder call within `max_patches` (GPU memory profile)."""
        ...
