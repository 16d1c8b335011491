"""RopeTable / MRopeTable (runtime/executor/model.py): per-position cos / sin tables on CPU, bit-exact to the
reference op (plugins/reference/rope.py rope_cos_sin) for 1-D positions and for random [3, T] M-RoPE positions,
including positions past the initial table (it grows) and negative ones (computed directly), in float32,
bfloat16 and float64; malformed M-RoPE positions get the reference's error."""
from __future__ import annotations

import pytest
import torch

from plugins.reference.rope import rope_cos_sin, rope_inv_freq
from runtime.executor.model import MRopeTable, RopeTable

CASES = [(16, 1e6, (2, 3, 3)), (128, 1e6, (16, 24, 24)), (64, 1e4, (8, 12, 12))]   # tiny-qwen2-vl, Qwen2-VL


def _equal(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and g.is_contiguous()
        assert torch.equal(g, w), (g - w).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("head_size, base, section", CASES)
def test_mrope_table_equals_reference(head_size: int, base: float, section: tuple[int, int, int],
                                      dtype: torch.dtype) -> None:
    inv_freq = rope_inv_freq(head_size, base, {"type": "mrope", "mrope_section": list(section)})
    table = MRopeTable(inv_freq, dtype, section, num_positions=64)
    generator = torch.Generator().manual_seed(head_size)
    for num_tokens, high in ((0, 10), (1, 60), (37, 64), (300, 1000), (130, 5000)):    # the last two grow it
        positions = torch.randint(0, high, (3, num_tokens), generator=generator)
        _equal(table.lookup_mrope(positions), rope_cos_sin(positions, inv_freq, dtype, section))
    assert table.cos.shape[0] == 8192
    flat = torch.randint(0, 9000, (50,), generator=generator)                   # 1-D positions: every axis alike
    _equal(table.lookup(flat), rope_cos_sin(flat.expand(3, -1), inv_freq, dtype, section))
    _equal(table.lookup(flat), rope_cos_sin(flat, inv_freq, dtype))
    negative = torch.tensor([[0, -3, 5], [1, 2, -7], [4, 4, 4]])
    _equal(table.lookup_mrope(negative), rope_cos_sin(negative, inv_freq, dtype, section))


def test_rope_table_grows_and_refuses_like_the_reference() -> None:
    inv_freq = rope_inv_freq(64, 1e4, None)
    table = RopeTable(inv_freq, torch.float32, num_positions=16)
    for positions in (torch.arange(10), torch.tensor([3, 100, 7]), torch.tensor([-2, 5])):
        _equal(table.lookup(positions), rope_cos_sin(positions, inv_freq, torch.float32))
    assert table.cos.shape[0] == 128
    section = (8, 12, 12)
    mtable = MRopeTable(rope_inv_freq(64, 1e4, None), torch.float32, section)
    with pytest.raises(ValueError, match=r"\[3, T\] positions"):
        mtable.lookup_mrope(torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="must sum to 32"):
        MRopeTable(inv_freq, torch.float32, (8, 8, 8))
