"""plugins/reference rope.py and rmsnorm.py against float64 formulas written here.

RoPE: inverse frequencies (default, linear, Llama 3 with all three wavelength regimes), the rotation
of (x_i, x_{i+D/2}) pairs by position * frequency, and M-RoPE's per-axis frequency sections.
Tolerances: frequencies 1e-6 relative (float32 storage); rotated values 5e-5 absolute (float32
angles up to position 255 with |x| <= 5). RMSNorm: float32 1e-6 relative,
float16 within fp16 rounding (2^-10 relative), and no overflow where x^2 exceeds the fp16 range.
"""
from __future__ import annotations

import math

import pytest
import torch

from plugins.reference.rmsnorm import rms_norm
from plugins.reference.rope import apply_rope, rope_cos_sin, rope_inv_freq

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def inv_freq_f64(head_size: int, base: float) -> list[float]:
    return [base ** (-(2 * i) / head_size) for i in range(head_size // 2)]


def llama3_f64(freq: float, scaling: dict[str, float]) -> tuple[float, str]:
    """One frequency after Llama 3 scaling, and which regime it fell in."""
    old_len = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    wavelen = 2 * math.pi / freq
    if wavelen < old_len / high:
        return freq, "high"
    if wavelen > old_len / low:
        return freq / factor, "low"
    smooth = (old_len / wavelen - low) / (high - low)
    return (1 - smooth) * freq / factor + smooth * freq, "medium"


def rotate_f64(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [T, H, D], angles [T, D/2]: pair (i, i + D/2) rotated as the complex number x_i + i x_{i+D/2}."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(
        torch.ones_like(angles, dtype=torch.float64), angles.double())[:, None, :]
    return torch.cat((z.real, z.imag), dim=-1)


@pytest.mark.parametrize("head_size,base", [(8, 10000.0), (64, 1e6), (128, 500000.0)])
def test_default_and_linear_inverse_frequencies(head_size: int, base: float) -> None:
    want = torch.tensor(inv_freq_f64(head_size, base), dtype=torch.float64)
    got = rope_inv_freq(head_size, base, None)
    assert got.shape == (head_size // 2,)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=0)
    linear = rope_inv_freq(head_size, base, {"type": "linear", "factor": 4.0})
    assert torch.allclose(linear.double(), want / 4, rtol=1e-6, atol=0)
    assert torch.equal(rope_inv_freq(head_size, base, {"type": "mrope", "mrope_section": [1, 1, 2]}), got)


def test_llama3_scaling_covers_every_regime() -> None:
    base_freqs = inv_freq_f64(128, 500000.0)
    expected = [llama3_f64(f, LLAMA3) for f in base_freqs]
    assert {regime for _, regime in expected} == {"high", "medium", "low"}
    got = rope_inv_freq(128, 500000.0, LLAMA3).double()
    want = torch.tensor([f for f, _ in expected], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-6, atol=0), (got / want - 1).abs().max()


def test_unknown_rope_scaling_is_refused() -> None:
    with pytest.raises(ValueError, match=r"rotary_scaling\.type: 'yarn'"):
        rope_inv_freq(64, 10000.0, {"type": "yarn", "factor": 2.0})


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (7, 1)])
def test_apply_rope_rotates_pairs_by_position_times_frequency(num_heads: int, num_kv_heads: int) -> None:
    gen = torch.Generator().manual_seed(num_heads * 10 + num_kv_heads)
    head_size, base = 16, 10000.0
    positions = torch.tensor([0, 1, 2, 7, 64, 255, 3])
    q = torch.randn(len(positions), num_heads, head_size, generator=gen)
    k = torch.randn(len(positions), num_kv_heads, head_size, generator=gen)
    angles = positions.double()[:, None] * torch.tensor(inv_freq_f64(head_size, base), dtype=torch.float64)[None]

    inv_freq = rope_inv_freq(head_size, base, None)
    cos, sin = rope_cos_sin(positions, inv_freq, torch.float32)
    assert cos.shape == (len(positions), head_size) and cos.dtype == torch.float32
    q_out, k_out = apply_rope(q.clone(), k.clone(), cos, sin)
    assert (q_out.double() - rotate_f64(q, angles)).abs().max() <= 5e-5
    assert (k_out.double() - rotate_f64(k, angles)).abs().max() <= 5e-5
    assert torch.equal(q_out[0], q[0])                           # position 0: no rotation

    # cos / sin are computed in float32 whatever the activation dtype (as HF): float64 activations get the same
    cos64, sin64 = rope_cos_sin(positions, inv_freq, torch.float64)
    assert cos64.dtype == torch.float64 and torch.equal(cos64, cos.double()) and torch.equal(sin64, sin.double())


def test_rope_scores_depend_only_on_relative_position() -> None:
    gen = torch.Generator().manual_seed(11)
    head_size = 32
    q, k = torch.randn(1, 1, head_size, generator=gen).double(), torch.randn(1, 1, head_size, generator=gen).double()
    inv_freq = rope_inv_freq(head_size, 10000.0, None)

    def score(pq: int, pk: int) -> float:
        cos, sin = rope_cos_sin(torch.tensor([pq, pk]), inv_freq, torch.float64)
        rq, rk = apply_rope(torch.cat([q, q]), torch.cat([k, k]), cos, sin)
        return float((rq[0, 0] * rk[1, 0]).sum())

    assert score(9, 4) == pytest.approx(score(105, 100), abs=1e-5)
    assert score(9, 4) != pytest.approx(score(9, 5), abs=1e-3)


def test_mrope_takes_each_frequency_section_from_its_axis() -> None:
    head_size, section = 16, (2, 3, 3)                            # sums to head_size / 2
    inv_freq = rope_inv_freq(head_size, 10000.0, None)
    positions = torch.tensor([[0, 5, 5, 5, 9], [0, 5, 6, 7, 9], [0, 5, 8, 3, 9]])    # t, h, w rows
    cos, sin = rope_cos_sin(positions, inv_freq, torch.float64, section)
    axis_of = [axis % 3 for axis, size in enumerate(section) for _ in range(size)]
    angles = torch.stack([positions[axis_of[i]].double() * inv_freq[i].double() for i in range(head_size // 2)], -1)
    want_cos = torch.cat([angles.cos(), angles.cos()], -1)
    want_sin = torch.cat([angles.sin(), angles.sin()], -1)
    assert torch.allclose(cos, want_cos, atol=1e-6) and torch.allclose(sin, want_sin, atol=1e-6)

    # equal t / h / w positions (text tokens) give exactly the 1-D rotation
    text = torch.tensor([3, 4, 20])
    cos_1d, sin_1d = rope_cos_sin(text, inv_freq, torch.float32)
    cos_3d, sin_3d = rope_cos_sin(text.expand(3, -1), inv_freq, torch.float32, section)
    assert torch.equal(cos_1d, cos_3d) and torch.equal(sin_1d, sin_3d)


@pytest.mark.parametrize("bad", [torch.zeros(5, dtype=torch.int64), torch.zeros(2, 5, dtype=torch.int64)])
def test_mrope_refuses_positions_that_are_not_three_rows(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"positions: M-RoPE needs \[3, T\]"):
        rope_cos_sin(bad, rope_inv_freq(16, 10000.0, None), torch.float32, (2, 3, 3))
    with pytest.raises(ValueError, match="positions: M-RoPE"):
        rope_cos_sin(torch.zeros(3, 5, dtype=torch.int64), rope_inv_freq(16, 10000.0, None), torch.float32, (2, 2, 2))


def rms_norm_f64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return weight.double() * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("eps", [1e-6, 1e-5, 0.5])
def test_rms_norm_float32_matches_float64(eps: float) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 24, generator=gen) * 3
    weight = torch.rand(24, generator=gen) + 0.5
    got = rms_norm(x, weight, eps)
    assert got.shape == x.shape and got.dtype == torch.float32
    want = rms_norm_f64(x, weight, eps)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-7)


def test_rms_norm_float16_normalises_in_float32() -> None:
    """Values whose squares overflow float16 (> 65504) still normalise: the mean square is taken in float32."""
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(4, 64, generator=gen) * 600).half()
    weight = (torch.rand(64, generator=gen) + 0.5).half()
    got = rms_norm(x, weight, 1e-6)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    want = rms_norm_f64(x, weight, 1e-6)
    # two roundings to float16 (normalised value, product): each <= 2^-11 relative
    assert ((got.double() - want).abs() <= 2 ** -10 * want.abs() + 1e-6).all()


def test_rms_norm_of_zeros_is_zero() -> None:
    out = rms_norm(torch.zeros(2, 8), torch.ones(8), 1e-6)
    assert torch.equal(out, torch.zeros(2, 8))
