"""The CPU op set's row kernels (plugins/cpu: rmsnorm, rope, the KV write) against the reference ops.

Random shapes over several seeds, contiguous inputs and the strided views the model passes (q / k
columns of one qkv projection). Tolerances, float32 against the reference op on the same inputs:
RMSNorm 1e-6 relative + 1e-6 absolute (float64 sum of squares, reassociated; inverse RMS rounded
once, as the reference rounds it); RoPE and the KV write bit-exact. float64 RMSNorm within 1e-12 of
float64 math written here (the reference normalises in float32). bfloat16 (no numba type) gives
exactly the reference's result.
"""
from __future__ import annotations

import random

import pytest
import torch

from plugins.cpu import paged_attention as cpu_attention
from plugins.cpu import rmsnorm as cpu_rmsnorm
from plugins.cpu import rope as cpu_rope
from plugins.reference import paged_attention as reference_attention
from plugins.reference import rmsnorm as reference_rmsnorm
from plugins.reference import rope as reference_rope
from plugins.registry import get_ops

TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}


def _shapes(seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(1, 40), rng.choice([16, 64, 100, 896])) for _ in range(6)]


def _rms_norm_f64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """float64 inputs: the reference normalises in float32, the kernel in float64; compare with float64 math."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_and_add_rms_norm_match_the_reference(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    tol = TOLERANCE[dtype]
    want_norm = reference_rmsnorm.rms_norm if dtype == torch.float32 else _rms_norm_f64
    for rows, hidden in _shapes(seed=7):
        x, residual = (torch.randn(rows, hidden, generator=gen, dtype=dtype) * 3 for _ in range(2))
        weight = torch.randn(hidden, generator=gen, dtype=dtype)
        torch.testing.assert_close(cpu_rmsnorm.rms_norm(x, weight, 1e-6), want_norm(x, weight, 1e-6),
                                   atol=tol, rtol=tol)
        want_residual = x + residual
        want_normed = want_norm(want_residual, weight, 1e-6)
        normed, new_residual = cpu_rmsnorm.add_rms_norm(x, residual, weight, 1e-6)
        torch.testing.assert_close(normed, want_normed, atol=tol, rtol=tol)
        assert new_residual is residual and torch.equal(residual, want_residual), "the sum is written in place"


def test_rms_norm_reads_strided_rows_and_falls_back_for_bfloat16() -> None:
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(9, 192, generator=gen)
    x, weight = wide[:, 64:128], torch.randn(64, generator=gen)          # a column block: row stride 192
    torch.testing.assert_close(cpu_rmsnorm.rms_norm(x, weight, 1e-5), reference_rmsnorm.rms_norm(x, weight, 1e-5),
                               atol=1e-6, rtol=1e-6)
    x16, r16, w16 = x.bfloat16(), torch.randn(9, 64, generator=gen).bfloat16(), weight.bfloat16()
    assert torch.equal(cpu_rmsnorm.rms_norm(x16, w16, 1e-6), reference_rmsnorm.rms_norm(x16, w16, 1e-6))
    normed, residual = cpu_rmsnorm.add_rms_norm(x16, r16.clone(), w16, 1e-6)
    want_normed, want_residual = reference_rmsnorm.add_rms_norm(x16, r16.clone(), w16, 1e-6)
    assert torch.equal(normed, want_normed) and torch.equal(residual, want_residual)


@pytest.mark.parametrize("seed", [0, 1])
def test_apply_rope_equals_the_reference_on_qkv_views(seed: int) -> None:
    """q and k as the model passes them: strided column views of one [T, (H + 2 Hkv) D] projection."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(4):
        tokens, num_kv_heads, group, head_size = rng.randint(1, 30), rng.choice([1, 2]), rng.choice([1, 2, 7]), \
            rng.choice([16, 64])
        num_heads = num_kv_heads * group
        qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_size, generator=gen)
        q = qkv[:, :num_heads * head_size].view(tokens, num_heads, head_size)
        k = qkv[:, num_heads * head_size:(num_heads + num_kv_heads) * head_size].view(tokens, num_kv_heads, head_size)
        positions = torch.randint(0, 4000, (tokens,), generator=gen)
        inv_freq = reference_rope.rope_inv_freq(head_size, 1e6, None)
        cos, sin = reference_rope.rope_cos_sin(positions, inv_freq, torch.float32)
        want_q, want_k = reference_rope.apply_rope(q.clone(), k.clone(), cos, sin)
        v_before = qkv[:, (num_heads + num_kv_heads) * head_size:].clone()
        got_q, got_k = cpu_rope.apply_rope(q, k, cos, sin)
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
        assert got_q.data_ptr() == q.data_ptr() and torch.equal(qkv[:, (num_heads + num_kv_heads) * head_size:],
                                                                 v_before), "rotated in place, v untouched"
    q16, k16 = q.bfloat16(), k.bfloat16()
    want = reference_rope.apply_rope(q16, k16, cos.bfloat16(), sin.bfloat16())
    got = cpu_rope.apply_rope(q16.clone(), k16.clone(), cos.bfloat16(), sin.bfloat16())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_write_kv_cache_equals_the_reference_skips_slot_minus_one_and_refuses_slots_past_the_cache(
        dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    num_blocks, block_size, num_kv_heads, head_size, tokens = 6, 4, 2, 16, 9
    shape = (num_blocks, block_size, num_kv_heads, head_size)

    def values(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * 40).to(dtype)

    key_cache, value_cache = values(*shape), values(*shape)
    kv = values(tokens, 2 * num_kv_heads * head_size)                     # k and v as strided column views
    k = kv[:, :num_kv_heads * head_size].view(tokens, num_kv_heads, head_size)
    v = kv[:, num_kv_heads * head_size:].view(tokens, num_kv_heads, head_size)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    want_k, want_v = key_cache.clone(), value_cache.clone()
    reference_attention.write_kv_cache(want_k, want_v, k, v, slots)
    cpu_attention.write_kv_cache(key_cache, value_cache, k, v, slots)
    assert torch.equal(key_cache, want_k) and torch.equal(value_cache, want_v)

    skipped = slots.clone()
    skipped[3] = -1
    before = key_cache.clone()
    cpu_attention.write_kv_cache(key_cache, value_cache, k * 0 if dtype.is_floating_point else k - k, v, skipped)
    flat = key_cache.view(-1, num_kv_heads, head_size)
    assert torch.equal(flat[slots[3]], before.view(-1, num_kv_heads, head_size)[slots[3]])
    assert not flat[skipped[skipped >= 0]].any()
    with pytest.raises(IndexError, match="slot_mapping"):
        cpu_attention.write_kv_cache(key_cache, value_cache, k, v, torch.full((tokens,), num_blocks * block_size))


def test_registry_gives_the_cpu_kernels_on_cpu() -> None:
    ops = get_ops(torch.device("cpu"))
    assert ops.name == "cpu"
    assert (ops.rms_norm, ops.add_rms_norm) == (cpu_rmsnorm.rms_norm, cpu_rmsnorm.add_rms_norm)
    assert (ops.apply_rope, ops.write_kv_cache) == (cpu_rope.apply_rope, cpu_attention.write_kv_cache)
