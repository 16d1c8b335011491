"""FP8 activations on CPU: the numba rounding through float8_e4m3fn is bit-identical to torch's conversion.

Compared on every finite e4m3 value, the midpoints between neighbours (ties: round to even) and the float32
values either side of them, zeros of both signs, NaN, infinities, values past 448, float32 subnormals and
random values, at three scales; and the FP8 linear of an fp32 CPU engine takes this path and gives
exactly the output of the torch expression it replaces (tolerance: none, bit for bit).
"""
from __future__ import annotations

import pytest
import torch

from plugins.cpu.fp8_round import round_through_e4m3
from runtime.executor.quant_linear import FP8Linear, build_linears
from tests.helpers.quant import tiny_cfg
from engine_format.quant_config import QuantSpec


def torch_round(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(torch.float32) * scale


def probe_values(scale: float) -> torch.Tensor:
    codes = torch.arange(256, dtype=torch.int64).to(torch.uint8).view(torch.float8_e4m3fn).float()
    grid = codes[~codes.isnan()].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    up, down = torch.nextafter(mids, torch.tensor(1e30)), torch.nextafter(mids, torch.tensor(-1e30))
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -1e-40, 1e-30,
                            448.0, 449.0, 464.0, 480.0, -500.0])
    gen = torch.Generator().manual_seed(0)
    random = torch.cat([torch.randn(50000, generator=gen) * 60, torch.randn(5000, generator=gen) * 1e-3])
    return torch.cat([grid, mids, up, down, special, random]) * scale


@pytest.mark.parametrize("scale", [1.0, 0.0123, 3.7])
def test_bit_identical_to_torch_conversion(scale: float) -> None:
    values = probe_values(scale)
    flat = torch.cat([values, values[:(-values.numel()) % 7]])      # whole rows of 7, every value kept
    x = flat.reshape(-1, 7)[:, :5]                   # a strided 2-D view (the op copies it contiguous)...
    assert torch.equal(round_through_e4m3(flat, torch.tensor([scale])).isnan(), flat.isnan())   # ...and all
    s = torch.tensor([scale])
    got, want = round_through_e4m3(x, s), torch_round(x, s)
    assert got.shape == x.shape and got.dtype == torch.float32
    same = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
    assert bool(same.all()), (x[~same][:4], got[~same][:4], want[~same][:4])
    got, want = round_through_e4m3(flat, s), torch_round(flat, s)
    assert bool(((got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())).all())


def test_fp8_linear_on_cpu_uses_it_and_matches_the_torch_expression() -> None:
    cfg = tiny_cfg("float32", QuantSpec("FP8", None))
    gen = torch.Generator().manual_seed(3)
    base = "transformer.layers.0.mlp.proj"
    weights = {f"{base}.weight": (torch.randn(128, 256, generator=gen) * 40).to(torch.float8_e4m3fn),
               f"{base}.weights_scaling_factor": torch.tensor([0.002]),
               f"{base}.activation_scaling_factor": torch.tensor([0.01])}
    linear = build_linears(cfg, weights, [base], torch.device("cpu"))[base]
    assert isinstance(linear, FP8Linear) and linear.round_input is round_through_e4m3
    x = torch.randn(9, 256, generator=gen)
    expected = torch.nn.functional.linear(torch_round(x, torch.tensor([0.01])), linear.weight)
    assert torch.equal(linear(x), expected)
