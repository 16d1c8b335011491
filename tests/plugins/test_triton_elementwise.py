"""Triton RMSNorm (+ residual), SiLU-and-multiply, RoPE / M-RoPE in place and the KV-cache write
against the reference ops, in Triton's interpreter on CPU (compiled on a GPU).

Tolerances: the kernels round where the reference rounds, so RMSNorm, SiLU-and-multiply and the KV
write match float32 to 1e-6 and float16 to one fp16 ulp (1e-3 relative); RoPE computes
x*cos - y*sin in float32 and rounds once where the reference rounds each product, so float16 differs
by up to 2 ulp (4e-3 absolute on values of magnitude <= 4).
"""
from __future__ import annotations

import pytest
import torch

from plugins.reference import activation, rmsnorm, rope
from plugins.reference.paged_attention import write_kv_cache as reference_write
from plugins.registry import REFERENCE_OPS, cpu_available, get_ops, triton_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def _close(out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> None:
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 1e-3, "rtol": 1e-3}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96, 896])
def test_rms_norm_and_fused_residual(dtype: torch.dtype, hidden: int) -> None:
    ops = triton_ops()
    x, residual = _randn(5, hidden, dtype=dtype, seed=1), _randn(5, hidden, dtype=dtype, seed=2)
    weight = _randn(hidden, dtype=dtype, seed=3)
    _close(ops.rms_norm(x, weight, 1e-6), rmsnorm.rms_norm(x, weight, 1e-6), **_tol(dtype))
    ref_out, ref_residual = rmsnorm.add_rms_norm(x, residual, weight, 1e-6)
    in_place = residual.clone()
    out, new_residual = ops.add_rms_norm(x, in_place, weight, 1e-6)
    assert new_residual.data_ptr() == in_place.data_ptr(), "the residual is updated in place"
    assert torch.equal(new_residual, ref_residual), "the sum is rounded to the dtype exactly as x + residual"
    _close(out, ref_out, **_tol(dtype))


def test_fused_residual_refuses_a_mismatched_residual() -> None:
    x = _randn(3, 64, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="residual"):
        triton_ops().add_rms_norm(x, x[:, :32], x[0], 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype: torch.dtype) -> None:
    gate, up = _randn(4, 1300, dtype=dtype, seed=4), _randn(4, 1300, dtype=dtype, seed=5)   # 2 column blocks
    _close(triton_ops().silu_and_mul(gate, up), activation.silu_and_mul(gate, up), **_tol(dtype))


def _qkv_views(num_tokens: int, num_heads: int, num_kv_heads: int, head_size: int, dtype: torch.dtype):
    """q, k, v as the model makes them: strided views of one fused projection output."""
    qkv = _randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_size, dtype=dtype, seed=6)
    q, k, v = qkv.split([num_heads * head_size, num_kv_heads * head_size, num_kv_heads * head_size], dim=-1)
    return (qkv, q.view(num_tokens, num_heads, head_size), k.view(num_tokens, num_kv_heads, head_size),
            v.view(num_tokens, num_kv_heads, head_size))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size,mrope_section", [(64, None), (128, None), (128, (16, 24, 24))])
def test_rope_in_place(dtype: torch.dtype, head_size: int, mrope_section: tuple[int, int, int] | None) -> None:
    num_tokens = 7
    qkv, q, k, _ = _qkv_views(num_tokens, 14, 2, head_size, dtype)
    inv_freq = rope.rope_inv_freq(head_size, 1e6, None).to(DEVICE)
    if mrope_section is None:
        positions = torch.tensor([0, 1, 5, 900, 4095, 17, 3], device=DEVICE)
    else:           # M-RoPE: time / height / width positions differ per token (an image's patches)
        positions = torch.tensor([[0, 1, 2, 2, 2, 2, 6], [0, 1, 2, 2, 3, 3, 6], [0, 1, 2, 3, 2, 3, 6]], device=DEVICE)
    cos, sin = rope.rope_cos_sin(positions, inv_freq, dtype, mrope_section)
    ref_q, ref_k = rope.apply_rope(q, k, cos, sin)
    out_q, out_k = triton_ops().apply_rope(q, k, cos, sin)
    assert out_q.data_ptr() == qkv.data_ptr(), "q is rotated in place, inside the fused projection"
    atol = 1e-5 if dtype == torch.float32 else 4e-3
    _close(out_q, ref_q, atol=atol, rtol=0)
    _close(out_k, ref_k, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", [64, 128])
def test_kv_cache_write_skips_negative_slots(dtype: torch.dtype, head_size: int) -> None:
    _, _, k, v = _qkv_views(6, 4, 2, head_size, dtype)
    slot_mapping = torch.tensor([13, -1, 2, 31, -1, 0], device=DEVICE)
    shape = (8, 4, 2, head_size)
    key_cache, value_cache = _randn(*shape, dtype=dtype, seed=7), _randn(*shape, dtype=dtype, seed=8)
    ref_keys, ref_values = key_cache.clone(), value_cache.clone()
    written = slot_mapping >= 0
    reference_write(ref_keys, ref_values, k[written], v[written], slot_mapping[written])
    triton_ops().write_kv_cache(key_cache, value_cache, k, v, slot_mapping)
    assert torch.equal(key_cache, ref_keys) and torch.equal(value_cache, ref_values)


def test_registry_picks_by_device_and_backend() -> None:
    auto_cpu = get_ops(torch.device("cpu"))
    assert auto_cpu.name == ("cpu" if cpu_available() else "reference") and not auto_cpu.graph_safe
    assert get_ops(torch.device("cpu"), "reference") is REFERENCE_OPS
    assert get_ops(torch.device("cpu"), "triton").name == "triton"
    assert get_ops(torch.device("cuda"), "reference") is REFERENCE_OPS
    assert get_ops(torch.device("cuda")).name == "triton" and get_ops(torch.device("cuda")).graph_safe
    assert not REFERENCE_OPS.graph_safe
    with pytest.raises(ValueError, match="backend"):
        get_ops(torch.device("cpu"), "cutlass")
