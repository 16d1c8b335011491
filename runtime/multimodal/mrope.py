"""M-RoPE positions of Qwen2-VL / Qwen2.5-VL prompts (three axes: time, height, width).

What it is for: the [3, L] position ids of a prompt that holds image / video
placeholder runs, equal to HF transformers 5.23 `get_rope_index` (with
`mm_token_type_ids` derived from the placeholder token ids), and the decode
delta: a token at index p >= L has position p + delta on all three axes.
Text runs advance all axes together; a visual run of grid (t, h, w) patches
gets temporal positions `start + floor(i * interval)` (interval 1, or for
Qwen2.5-VL videos `tokens_per_second * second_per_grid_t` in float32 as HF
computes it) and spatial positions `start + row` / `start + col` over the
merged grid; the text after it starts at `start + max(h, w) // merge`.
Not for: cos / sin (plugins/reference/rope.py) or finding the spans
(runtime/multimodal/processor.py).
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2


class VisualGrid(Protocol):
    """What positions need of a `runtime.multimodal.image_processing.ProcessedVisual`."""

    @property
    def kind(self) -> str: ...

    @property
    def grid_thw(self) -> tuple[int, int, int]: ...

    @property
    def second_per_grid_t(self) -> float: ...


@dataclass(frozen=True, slots=True)
class MRopeSpec:
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    spatial_merge_size: int
    tokens_per_second: float = 0.0     # Qwen2.5-VL only; Qwen2-VL spaces video frames by 1
    model_type: str = "qwen2_vl"       # "qwen2_vl" | "qwen2_5_vl"

    @property
    def time_aware(self) -> bool:
        return self.model_type == "qwen2_5_vl"


def mrope_positions(token_ids: Sequence[int], visuals: Sequence[VisualGrid],
                    spec: MRopeSpec) -> tuple[np.ndarray, int]:
    """[3, len(token_ids)] int64 positions equal to HF get_rope_index, and the decode delta.

    `visuals` are in prompt order, one per maximal run of placeholder tokens.
    Raises ValueError when the runs and the visuals disagree (kind, count, length).
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.size == 0:
        return np.zeros((3, 0), dtype=np.int64), 0
    types = np.where(ids == spec.image_token_id, IMAGE, np.where(ids == spec.video_token_id, VIDEO, TEXT))
    pieces: list[np.ndarray] = []
    current = 0
    remaining = iter(visuals)
    index = 0
    for modality, group in itertools.groupby(types.tolist()):
        length = len(list(group))
        if modality == TEXT:
            pieces.append(np.broadcast_to(np.arange(length, dtype=np.int64) + current, (3, length)))
            current += length
        else:
            visual = next(remaining, None)
            kind = "image" if modality == IMAGE else "video"
            if visual is None:
                raise ValueError(f"token_ids: the {kind} placeholder run at {index} has no visual")
            if visual.kind != kind:
                raise ValueError(f"visuals: the run at {index} is {kind} placeholders, the visual is {visual.kind}")
            positions, advance = _visual_positions(visual, current, spec)
            if positions.shape[1] != length:
                raise ValueError(f"token_ids: the {kind} run at {index} has {length} placeholders, its grid "
                                 f"{tuple(visual.grid_thw)} needs {positions.shape[1]}")
            pieces.append(positions)
            current += advance
        index += length
    if next(remaining, None) is not None:
        raise ValueError("visuals: more visuals than placeholder runs in token_ids")
    positions = np.concatenate(pieces, axis=1)
    return np.ascontiguousarray(positions), int(positions.max()) + 1 - len(ids)


def _visual_positions(visual: VisualGrid, start: int, spec: MRopeSpec) -> tuple[np.ndarray, int]:
    t, h, w = (int(x) for x in visual.grid_thw)
    merge = spec.spatial_merge_size
    grid_t, grid_h, grid_w = t, h // merge, w // merge
    if spec.time_aware and visual.kind == "video":
        # float32 as HF: tokens_per_second * second_per_grid_ts[i] (a float32 tensor), times arange, then .long()
        interval = np.float32(spec.tokens_per_second) * np.float32(visual.second_per_grid_t)
        temporal = (np.arange(grid_t, dtype=np.float32) * interval).astype(np.int64)
    else:
        temporal = np.arange(grid_t, dtype=np.int64)
    tt, hh, ww = np.meshgrid(temporal + start, np.arange(grid_h) + start, np.arange(grid_w) + start, indexing="ij")
    positions = np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]).astype(np.int64)
    return positions, max(h, w) // merge


def positions_for_range(prompt_positions: np.ndarray, delta: int, start: int, end: int) -> np.ndarray:
    """[3, end - start] positions of tokens [start, end): prompt rows, then p + delta past the prompt."""
    split = min(max(prompt_positions.shape[1], start), end)
    out = np.empty((3, end - start), dtype=np.int64)
    out[:, :split - start] = prompt_positions[:, start:split]
    out[:, split - start:] = np.arange(split, end, dtype=np.int64) + delta
    return out
