"""Every Triton kernel against the reference op on a CUDA GPU, compiled, in bf16 and fp16, at real
model shapes (Qwen2.5-0.5B: 14 / 2 heads of 64; Qwen2-VL-2B: 12 / 2 heads of 128), long contexts
(split-K) and chunked prefill. Skipped where no GPU is present (CI is CPU; the same kernels run in
Triton's interpreter there: tests/plugins/test_triton_*.py).

Tolerances: attention against a float64 reference on the same low-precision inputs, absolute
1.5e-2 (bf16) / 3e-3 (fp16) on outputs of magnitude <= 3 (output rounding plus probabilities
rounded before P @ V); element-wise kernels within 2 ulp of the reference op in the same dtype.
"""
from __future__ import annotations

import pytest
import torch

from plugins.reference import activation, rmsnorm, rope
from plugins.reference.paged_attention import paged_attention, write_kv_cache
from plugins.registry import get_ops
from plugins.triton.attention_decode import paged_attention_decode
from tests.helpers.paged_cases import PagedCase, make_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = [torch.bfloat16, torch.float16]
ATTENTION_ATOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
ULP2 = {torch.bfloat16: 2 * 2**-8, torch.float16: 2 * 2**-11}
SHAPES = [(2, 7, 64), (2, 6, 128), (4, 1, 128), (2, 2, 64)]      # (kv heads, group, head size)


def _ops():
    ops = get_ops(torch.device("cuda"))
    assert ops.name == "triton" and ops.graph_safe
    return ops


def _reference(case: PagedCase) -> torch.Tensor:
    key_cache, value_cache = case.reference_cache()
    return paged_attention(case.q.double(), key_cache.double(), value_cache.double(), case.block_tables,
                           case.seq_lens, case.query_lens, case.scale)


def _check_attention(out: torch.Tensor, case: PagedCase, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "read outside the sequence (NaN)"
    torch.testing.assert_close(out.double(), _reference(case), atol=ATTENTION_ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads,group,head_size", SHAPES)
def test_decode_long_and_ragged(num_kv_heads: int, group: int, head_size: int, dtype: torch.dtype) -> None:
    case = make_case([4000, 1, 333, 2049, 64, 17], [1] * 6, num_kv_heads, group, head_size, 32, dtype, "cuda",
                     seed=head_size + group)
    out = _ops().paged_attention_meta(case.q, case.key_cache, case.value_cache, case.metadata(), case.scale)
    _check_attention(out, case, dtype)
    for num_splits in (1, 7):
        forced = paged_attention_decode(case.q, case.key_cache, case.value_cache, case.block_tables,
                                        case.metadata().seq_lens_tensor, case.scale, num_splits=num_splits)
        _check_attention(forced, case, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads,group,head_size", SHAPES)
def test_prefill_chunked_and_mixed(num_kv_heads: int, group: int, head_size: int, dtype: torch.dtype) -> None:
    case = make_case([700, 1500, 90, 33], [700, 300, 1, 33], num_kv_heads, group, head_size, 16, dtype, "cuda",
                     seed=2 * head_size + group)
    out = _ops().paged_attention_meta(case.q, case.key_cache, case.value_cache, case.metadata(), case.scale)
    _check_attention(out, case, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_kernels(dtype: torch.dtype) -> None:
    ops, gen = _ops(), torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device="cuda").to(dtype)

    x, residual, weight = randn(300, 1536), randn(300, 1536), randn(1536)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-6), rmsnorm.rms_norm(x, weight, 1e-6),
                               atol=ULP2[dtype] * 8, rtol=ULP2[dtype])
    ref_out, ref_residual = rmsnorm.add_rms_norm(x, residual, weight, 1e-6)
    out, new_residual = ops.add_rms_norm(x, residual.clone(), weight, 1e-6)
    torch.testing.assert_close(new_residual, ref_residual, atol=0, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=ULP2[dtype] * 8, rtol=ULP2[dtype])
    gate, up = randn(300, 8960), randn(300, 8960)
    torch.testing.assert_close(ops.silu_and_mul(gate, up), activation.silu_and_mul(gate, up),
                               atol=ULP2[dtype] * 4, rtol=ULP2[dtype])
    for heads, kv_heads, head_size, section in ((14, 2, 64, None), (12, 2, 128, (16, 24, 24))):
        qkv = randn(257, (heads + 2 * kv_heads) * head_size)
        q, k, v = qkv.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], dim=-1)
        q, k, v = q.view(257, heads, head_size), k.view(257, kv_heads, head_size), v.view(257, kv_heads, head_size)
        positions = torch.randint(0, 32768, (257,) if section is None else (3, 257), device="cuda")
        cos, sin = rope.rope_cos_sin(positions, rope.rope_inv_freq(head_size, 1e6, None).cuda(), dtype, section)
        ref_q, ref_k = rope.apply_rope(q, k, cos, sin)
        out_q, out_k = ops.apply_rope(q, k, cos, sin)
        torch.testing.assert_close(out_q, ref_q, atol=4 * ULP2[dtype] * 4, rtol=0)
        torch.testing.assert_close(out_k, ref_k, atol=4 * ULP2[dtype] * 4, rtol=0)
        caches = [randn(20, 32, kv_heads, head_size), randn(20, 32, kv_heads, head_size)]
        caches += [c.clone() for c in caches]
        slots = torch.randperm(640, generator=gen, device="cuda")[:257]
        slots[::5] = -1
        written = slots >= 0
        write_kv_cache(caches[0], caches[1], k[written], v[written], slots[written])
        ops.write_kv_cache(caches[2], caches[3], k, v, slots)
        assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
