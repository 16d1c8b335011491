"""LLaVA-NeXT's anyres geometry and the gather indices that order a visual's rows for the LLM.

What it is for: the one statement of how an image of height x width maps to
crops and LLM rows, used by the preprocessing (which crops to make), the
placeholder count (how many `<image>` tokens) and the tower feed (which feature
rows, in which order): HF's `select_best_resolution`, the crop grid, the
unpadding of the grid's feature map to the image's aspect ratio
(`unpad_image`, `LlavaNextProcessor._get_unpadded_features`) and the
`image_newline` row after every feature row (`pack_image_features`). LLaVA-1.5
is the degenerate case: one crop, its rows in order.
Not for: pixels (runtime/families/llava/preprocess.py) or the tower (tower.py).
"""
from __future__ import annotations

import math

import numpy as np

from engine_format.families.llava import LlavaVisionConfig


def select_best_resolution(height: int, width: int, pinpoints: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The pinpoint (h, w) keeping the most of the image's resolution, then wasting the least (HF's rule)."""
    best, best_effective, best_wasted = pinpoints[0], -1, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = ph * pw - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (ph, pw), effective, wasted
    return best


def crop_grid(cfg: LlavaVisionConfig, height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of S x S crops of the anyres canvas; (0, 0) for LLaVA-1.5."""
    if not cfg.is_next:
        return 0, 0
    ph, pw = select_best_resolution(height, width, cfg.grid_pinpoints)
    return ph // cfg.image_size, pw // cfg.image_size


def unpadded_window(height: int, width: int, grid_h: int, grid_w: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the grid_h x grid_w feature map that the image covers (HF unpad_image)."""
    if width / height > grid_w / grid_h:
        new_h = int(round(height * (grid_w / width), 7))
        pad = (grid_h - new_h) // 2
        return pad, grid_h - pad, 0, grid_w
    new_w = int(round(width * (grid_h / height), 7))
    pad = (grid_w - new_w) // 2
    return 0, grid_h, pad, grid_w - pad


def num_image_tokens(cfg: LlavaVisionConfig, height: int, width: int) -> int:
    """LLM placeholder tokens of one image (HF LlavaProcessor / LlavaNextProcessor)."""
    if not cfg.is_next:
        return cfg.tokens_per_crop
    side = cfg.patches_per_side
    rows, cols = crop_grid(cfg, height, width)
    top, bottom, left, right = unpadded_window(height, width, rows * side, cols * side)
    return cfg.tokens_per_crop + (bottom - top) * (right - left + 1)


def gather_index(cfg: LlavaVisionConfig, height: int, width: int, rows: int, cols: int, first_crop: int,
                 newline_row: int) -> np.ndarray:
    """int64 indices, into all crops' feature rows flattened, of one image's LLM rows in order.

    first_crop: the image's base crop within the encoder call; newline_row: the index of the
    image_newline row (NeXT). HF's order: base crop rows, then the unpadded grid row by row, each
    feature row followed by the newline."""
    per_crop, side = cfg.tokens_per_crop, cfg.patches_per_side
    base = first_crop * per_crop + np.arange(per_crop, dtype=np.int64)
    if not cfg.is_next:
        return base
    top, bottom, left, right = unpadded_window(height, width, rows * side, cols * side)
    i = np.arange(top, bottom, dtype=np.int64)[:, None]
    j = np.arange(left, right, dtype=np.int64)[None, :]
    crop = first_crop + 1 + (i // side) * cols + (j // side)
    grid = crop * per_crop + (i % side) * side + (j % side)
    newline = np.full((grid.shape[0], 1), newline_row, dtype=np.int64)
    return np.concatenate([base, np.concatenate([grid, newline], axis=1).reshape(-1)])
