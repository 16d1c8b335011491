"""Host-side inputs of the vision tower, computed from the images' patch grids.

What it is for: the data-dependent tensors that keep the tower's graph static
(REFERENCE.md section 4): per-patch 2-D rotary positions in merge-block order,
`cu_seqlens` (one attention segment per frame), and for Qwen2.5-VL the window
permutation (`window_index`, over merged tokens) and `cu_window_seqlens`.
Every vision backend (PyTorch, ONNX Runtime, TensorRT) takes exactly these,
so they are computed here once, on the CPU, with the same semantics as
transformers' `get_vision_position_ids` / `get_vision_cu_seqlens` /
`get_vision_window_index`.
Not for: running the tower (runtime/families/qwen2_vl/tower.py) or image preprocessing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from runtime.errors import FieldError
from engine_format.families.qwen2_vl import QwenVisionConfig

GridTHW = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class VisionInputs:
    position_ids: torch.Tensor                 # [N, 2] int64: (row, column) of every patch
    cu_seqlens: torch.Tensor                   # [S + 1] int32: one segment per frame
    window_index: torch.Tensor | None          # [N / merge^2] int64 (Qwen2.5-VL)
    cu_window_seqlens: torch.Tensor | None     # [W + 1] int32, in patches (Qwen2.5-VL)

    @property
    def num_patches(self) -> int:
        return int(self.position_ids.shape[0])


def check_grids(grid_thws: Sequence[GridTHW], merge: int, field: str = "grid_thw") -> None:
    if not grid_thws:
        raise FieldError(field, "expected at least one image or video")
    for i, grid in enumerate(grid_thws):
        if len(grid) != 3 or any(int(x) < 1 for x in grid):
            raise FieldError(f"{field}[{i}]", f"expected 3 positive integers (t, h, w), got {tuple(grid)}")
        if grid[1] % merge or grid[2] % merge:
            raise FieldError(f"{field}[{i}]", f"h and w must be multiples of spatial_merge_size {merge}, "
                             f"got {tuple(grid)}")


def num_patches(grid_thws: Sequence[GridTHW]) -> int:
    return sum(t * h * w for t, h, w in grid_thws)


def num_merged_tokens(grid_thws: Sequence[GridTHW], merge: int) -> int:
    """Rows of the tower's output: one per merge x merge block of patches."""
    return num_patches(grid_thws) // (merge * merge)


def position_ids(grid_thws: Sequence[GridTHW], merge: int) -> np.ndarray:
    """[N, 2] (row, column) per patch; patches ordered block by block (merge x merge), frame by frame."""
    frames: dict[tuple[int, int], np.ndarray] = {}     # one frame's ids per (h, w): a batch of same-size images
    parts = []
    for t, h, w in grid_thws:
        frame = frames.get((h, w))
        if frame is None:
            rows, cols = np.meshgrid(np.arange(h, dtype=np.int64), np.arange(w, dtype=np.int64), indexing="ij")
            blocks = (h // merge, merge, w // merge, merge)
            rows = rows.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
            cols = cols.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
            frame = frames[(h, w)] = np.stack([rows, cols], axis=-1)
        parts.extend([frame] * t)
    return np.concatenate(parts)


def cu_seqlens(grid_thws: Sequence[GridTHW]) -> np.ndarray:
    """Segment boundaries, one segment per frame (frames of a video attend only within themselves)."""
    lengths = [h * w for t, h, w in grid_thws for _ in range(t)]
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def window_index(grid_thws: Sequence[GridTHW], merge: int, window_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL windows: the permutation of merged tokens into windows and the windows' patch boundaries.

    Each frame's merged grid is cut into window_side x window_side windows from the
    top-left (the last row / column of windows may be partial); windows are
    listed row by row, tokens inside a window row by row.
    """
    order: list[np.ndarray] = []
    lengths: list[int] = []
    offset = 0
    for t, h, w in grid_thws:
        mh, mw = h // merge, w // merge
        index = np.arange(t * mh * mw).reshape(t, mh, mw) + offset
        for frame in range(t):
            for r in range(0, mh, window_side):
                for c in range(0, mw, window_side):
                    window = index[frame, r:r + window_side, c:c + window_side].reshape(-1)
                    order.append(window)
                    lengths.append(window.size * merge * merge)
        offset += t * mh * mw
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return np.concatenate(order).astype(np.int64), bounds


def vision_inputs(grid_thws: Sequence[GridTHW], cfg: QwenVisionConfig) -> VisionInputs:
    grids = [tuple(int(x) for x in g) for g in grid_thws]
    check_grids(grids, cfg.spatial_merge_size)
    windows = window_index(grids, cfg.spatial_merge_size, cfg.window_merged_side) if cfg.uses_windows else None
    return VisionInputs(
        position_ids=torch.from_numpy(position_ids(grids, cfg.spatial_merge_size)),
        cu_seqlens=torch.from_numpy(cu_seqlens(grids)),
        window_index=torch.from_numpy(windows[0]) if windows else None,
        cu_window_seqlens=torch.from_numpy(windows[1]) if windows else None)
