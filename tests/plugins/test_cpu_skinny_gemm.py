"""The CPU op for decode-size linears (plugins/cpu/skinny_gemm.py) against float64 x W^T + b.

Shapes: rows across the kernel's range (whole 4-row tiles and remainders), outputs a multiple of 4 and not
(the tail), odd and even K, with and without bias, on 1 and 2 threads. Tolerance: 1e-5 of the largest |ref|
(float32 sums in another order). The output is the same bit for bit whatever the thread count (each output
block is computed by one thread, the same way)."""
from __future__ import annotations

import pytest
import torch

from plugins.cpu.skinny_gemm import SKINNY_ROWS, skinny_linear


@pytest.mark.parametrize("rows", [SKINNY_ROWS[0], 5, 7, 16, SKINNY_ROWS[1]])
@pytest.mark.parametrize("out_features,in_features", [(8, 16), (13, 33), (771, 512), (3, 8)])
def test_matches_float64_and_is_the_same_on_any_thread_count(rows: int, out_features: int, in_features: int) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=gen)
    x = torch.randn(rows, in_features, generator=gen)
    threads = torch.get_num_threads()
    try:
        for bias in (None, torch.randn(out_features, generator=gen)):
            want = x.double() @ weight.double().t() + (0 if bias is None else bias.double())
            got = {}
            for count in (1, 2):
                torch.set_num_threads(count)
                got[count] = skinny_linear(x, weight, bias)
                err = float((got[count].double() - want).abs().max())
                assert err <= 1e-5 * float(want.abs().max()), f"max error {err:.3e}"
            assert torch.equal(got[1], got[2])
    finally:
        torch.set_num_threads(threads)

