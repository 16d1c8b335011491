"""Qwen2-VL / Qwen2.5-VL pixel preprocessing, equal to Hugging Face's image processor.

What it is for: turning decoded RGB images and video frames into the flat patch
rows the vision tower takes (`pixel_values [t*h*w, C*T*P*P]` float32 in HF's patch
order) plus `grid_thw`, the per-visual metadata and a content hash for prefix
caching. Pillow and numpy only; no torch.
Not for: decoding bytes or enforcing request limits (see `runtime/multimodal/image_io.py`),
tokenisation or M-RoPE positions (see `runtime/multimodal/processor.py`, `runtime/multimodal/mrope.py`).
Colour conversion, the size check and the normalisation are the shared steps of
runtime/multimodal/image_processing.py.

Equality with HF (`Qwen2VLImageProcessorPil`, transformers 5.x) is exact, bit for
bit: the same `smart_resize`, a Pillow bicubic resize of the uint8 RGB image,
rescale in float64 then cast to float32, normalise in float32, and the same patch
order. Videos use the same per-frame steps (HF's video processor resizes with
torchvision instead, which this module cannot match without torch) and HF's
video patch order, padding the frame count to a multiple of
`temporal_patch_size` by repeating the last frame as HF does.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from runtime.errors import FieldError
from runtime.families.preprocess_checks import FIELD, check_keys, float_triple, positive_float, positive_int
from runtime.multimodal.image_processing import (ProcessedVisual, check_image_size, content_hash, normalise_channels,
                                                 normalise_table, rgb_image)

_INT_KEYS = ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels")
_TRIPLE_KEYS = ("image_mean", "image_std")
_ALL_KEYS = frozenset(_INT_KEYS + _TRIPLE_KEYS + ("rescale_factor",))


@dataclass(frozen=True, slots=True)
class PreprocessConfig:
    """The `preprocessing` block of `vision/config.json` (HF preprocessor_config values)."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float

    @property
    def factor(self) -> int:
        """Side lengths after resizing are multiples of this (one merged patch)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> PreprocessConfig:
        """Validate and build; a FieldError names `preprocessing.<key>` and the rule."""
        d = check_keys(d, _ALL_KEYS, _ALL_KEYS)
        ints = {k: positive_int(k, d[k]) for k in _INT_KEYS}
        if ints["max_pixels"] < ints["min_pixels"]:
            raise FieldError(f"{FIELD}.max_pixels",
                             f"must be >= min_pixels ({ints['min_pixels']}), got {ints['max_pixels']}")
        mean = float_triple("image_mean", d["image_mean"], positive=False)
        std = float_triple("image_std", d["image_std"], positive=True)
        rescale = positive_float("rescale_factor", d["rescale_factor"])
        return cls(image_mean=mean, image_std=std, rescale_factor=rescale, **ints)


def smart_resize(height: int, width: int, cfg: PreprocessConfig,
                 field: str = "image") -> tuple[int, int]:
    """HF's `smart_resize`: sides become multiples of `cfg.factor`, area within [min, max] pixels.

    Raises FieldError where HF raises (aspect ratio above 200) and for empty images.
    """
    check_image_size(height, width, field)
    factor = cfg.factor
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > cfg.max_pixels:
        beta = math.sqrt((height * width) / cfg.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < cfg.min_pixels:
        beta = math.sqrt(cfg.min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess_image(image: Image.Image, cfg: PreprocessConfig, *,
                     field: str = "image") -> ProcessedVisual:
    """One image -> `[h*w, C*T*P*P]` patch rows with grid (1, h, w), equal to HF."""
    frame = _resized_frame(image, cfg, field)
    return _make_visual("image", frame[None], cfg, second_per_grid_t=0.0, still=True)


def preprocess_video(frames: Sequence[Image.Image], cfg: PreprocessConfig, fps: float, *,
                     field: str = "video") -> ProcessedVisual:
    """Already-sampled frames shown at `fps` -> patch rows with grid (t, h, w).

    All frames must have one size. The frame count is padded to a multiple of
    `temporal_patch_size` by repeating the last frame (as HF does).
    """
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise FieldError(f"{field}.fps", f"must be a finite number > 0, got {fps!r}")
    if len(frames) == 0:
        raise FieldError(field, "video has no frames")
    size = frames[0].size
    for index, frame in enumerate(frames):
        if frame.size != size:
            raise FieldError(f"{field}[{index}]", f"frame is {frame.size[0]}x{frame.size[1]}, "
                                                  f"frame 0 is {size[0]}x{size[1]}")
    arrays = [_resized_frame(frame, cfg, f"{field}[{i}]") for i, frame in enumerate(frames)]
    pad = -len(arrays) % cfg.temporal_patch_size
    arrays.extend([arrays[-1]] * pad)
    stacked = np.stack(arrays)
    return _make_visual("video", stacked, cfg, second_per_grid_t=cfg.temporal_patch_size / fps, still=False)


def _resized_frame(image: Image.Image, cfg: PreprocessConfig, field: str) -> np.ndarray:
    """Resize (bicubic) one frame -> uint8 [H, W, C]."""
    rgb = rgb_image(image, field)
    width, height = rgb.size
    new_height, new_width = smart_resize(height, width, cfg, field)
    return np.asarray(rgb.resize((new_width, new_height), Image.Resampling.BICUBIC))


def _make_visual(kind: str, frames: np.ndarray, cfg: PreprocessConfig, second_per_grid_t: float,
                 still: bool) -> ProcessedVisual:
    """Patchify uint8 frames [F, H, W, C] in HF's order, rescale and normalise them (`normalise`, by table
    lookup: the uint8 patches are rearranged, then each becomes float32 once), hashing the uint8 patches. F is a
    multiple of T, or `still` (an image): one frame that stands for all T of its temporal patch."""
    num_frames, height, width, channels = frames.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    grid_t, grid_h, grid_w = (1, height // p, width // p) if still else (num_frames // t, height // p, width // p)
    per_frame = 1 if still else t
    blocks = frames.reshape(grid_t, per_frame, grid_h // m, m, p, grid_w // m, m, p, channels)
    # -> (grid_t, gh/m, gw/m, m_h, m_w, C, T, p_h, p_w): HF's row order and row layout.
    blocks = blocks.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    num_rows = grid_t * grid_h * grid_w
    pixels = np.ascontiguousarray(blocks).reshape(num_rows, channels, per_frame, p * p)
    rows = np.empty((num_rows, channels, t, p * p), dtype=np.float32)
    table = normalise_table(cfg.rescale_factor, cfg.image_mean, cfg.image_std)
    normalise_channels(pixels, table, rows[:, :, :per_frame])
    if still:
        rows[:, :, 1:] = rows[:, :, :1]          # an image repeated over the temporal patch, as HF does
    pixel_values = rows.reshape(num_rows, channels * t * p * p)
    grid_thw = (grid_t, grid_h, grid_w)
    return ProcessedVisual(kind=kind, pixel_values=pixel_values, grid_thw=grid_thw,
                           second_per_grid_t=second_per_grid_t,
                           content_hash=content_hash(kind, grid_thw, second_per_grid_t, pixels),
                           merge_size=m)
