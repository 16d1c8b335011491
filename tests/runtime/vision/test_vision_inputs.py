"""Host-side vision inputs against transformers' own helpers (exact integer equality)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from runtime.errors import FieldError
from runtime.families.qwen2_vl.tower_inputs import check_grids, cu_seqlens, num_merged_tokens, position_ids, window_index

GRIDS = [
    [(1, 2, 2)],
    [(1, 4, 6)],
    [(1, 8, 8), (2, 6, 10), (1, 16, 4)],     # several images and a video
    [(3, 14, 22)],                             # partial windows at the right and bottom
    [(1, 32, 32), (1, 2, 30)],
    [(1, 4, 6), (2, 6, 10), (1, 4, 6), (1, 4, 6), (2, 6, 10)],     # repeated sizes (ids built once per size)
]


@pytest.mark.parametrize("grids", GRIDS)
def test_positions_and_segments_equal_hf(grids: list[tuple[int, int, int]]) -> None:
    grid_thw = torch.tensor(grids)
    np.testing.assert_array_equal(position_ids(grids, 2), get_vision_position_ids(grid_thw, 2).numpy())
    ours = cu_seqlens(grids)
    np.testing.assert_array_equal(ours, get_vision_cu_seqlens(grid_thw).numpy())
    assert ours.dtype == np.int32 and len(ours) == sum(t for t, _, _ in grids) + 1


@pytest.mark.parametrize("grids", GRIDS)
@pytest.mark.parametrize("window_size", [56, 112])
def test_window_index_equals_hf(grids: list[tuple[int, int, int]], window_size: int) -> None:
    index, bounds = window_index(grids, 2, window_size // 2 // 14)
    ref_index, ref_bounds = get_vision_window_index(torch.tensor(grids), 2, window_size, 14)
    np.testing.assert_array_equal(index, ref_index.numpy())
    np.testing.assert_array_equal(bounds, ref_bounds.numpy())
    assert sorted(index.tolist()) == list(range(num_merged_tokens(grids, 2)))   # a permutation


def test_bad_grids_name_the_field() -> None:
    with pytest.raises(FieldError, match=r"grid_thw\[1\].*multiples of spatial_merge_size 2"):
        check_grids([(1, 2, 2), (1, 3, 4)], 2)
    with pytest.raises(FieldError, match=r"grid_thw\[0\].*positive"):
        check_grids([(0, 2, 2)], 2)
    with pytest.raises(FieldError, match="at least one"):
        check_grids([], 2)
