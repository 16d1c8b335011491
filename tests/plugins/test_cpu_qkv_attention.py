"""The CPU op set's fused `qkv_attention` (plugins/cpu/paged_attention.py) against its semantics, the
composition of the reference ops (plugins/reference/qkv_attention.py): split, RoPE, KV write, attention.

Cases from tests/helpers/paged_cases.py (ragged sequences at random blocks with holes, every slot no
sequence owns NaN); the op's rows are each sequence's last query_len tokens, written by the op itself.
Batches: decode rows, whole prompts, chunked prefill after a cached prefix, one-token chunks, mixed;
GQA ratios 1, 2 and 7; head sizes 16 and 64; block sizes 4, 8 and 16; random layouts over several seeds.
Tolerances: the attention output (float32) against the reference run in float64 on the same inputs, 2e-5
absolute (summation order, the polynomial exp); the cache the op writes (rotated k, v) equals the reference
composition's, in float32, bit for bit.
"""
from __future__ import annotations

import random

import pytest
import torch

from plugins.cpu import paged_attention as cpu_attention
from plugins.reference.qkv_attention import REFERENCE_QKV_ATTENTION
from plugins.registry import get_ops
from tests.helpers.paged_cases import PagedCase, make_case

TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-10}


def _inputs(case: PagedCase, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv rows [T, (H + 2 Hkv) D], cos / sin [T, D] (random angles), each row's slot."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens, num_heads, head_size = case.q.shape
    block_size, num_kv_heads = case.key_cache.shape[1], case.key_cache.shape[2]
    dtype = case.q.dtype
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_size, generator=gen).to(dtype)
    angles = torch.rand(num_tokens, head_size // 2, generator=gen, dtype=torch.float64) * 100
    angles = torch.cat([angles, angles], dim=-1)
    slots = []
    for i, (seq_len, query_len) in enumerate(zip(case.seq_lens, case.query_lens)):
        for p in range(seq_len - query_len, seq_len):
            slots.append(int(case.block_tables[i, p // block_size]) * block_size + p % block_size)
    return qkv, angles.cos().to(dtype), angles.sin().to(dtype), torch.tensor(slots, dtype=torch.int64)


def _check(case: PagedCase, seed: int) -> None:
    dtype = case.q.dtype
    qkv, cos, sin, slots = _inputs(case, seed)
    key_cache, value_cache = case.key_cache.clone(), case.value_cache.clone()
    out = cpu_attention.qkv_attention(qkv, cos, sin, key_cache, value_cache, slots, case.metadata(), case.scale)
    assert out.shape == (qkv.shape[0], case.q.shape[1] * case.q.shape[2]) and out.dtype == dtype
    assert not out.isnan().any(), "the kernel read a slot outside its sequence (NaN)"
    ref_keys, ref_values = case.reference_cache()
    want = REFERENCE_QKV_ATTENTION(qkv.double(), cos.double(), sin.double(), ref_keys.double(),
                                   ref_values.double(), slots, case.metadata(), case.scale)
    torch.testing.assert_close(out.double(), want, atol=TOLERANCE[dtype], rtol=0)
    REFERENCE_QKV_ATTENTION(qkv, cos, sin, ref_keys, ref_values, slots, case.metadata(), case.scale)
    assert torch.equal(key_cache.nan_to_num(0.0), ref_keys), "rotated keys differ from the reference's"
    assert torch.equal(value_cache.nan_to_num(0.0), ref_values)


@pytest.mark.parametrize("num_kv_heads,group,head_size,block_size", [(2, 1, 16, 4), (2, 2, 64, 16), (1, 7, 16, 4)])
def test_mixed_batch_matches_the_reference_composition(num_kv_heads: int, group: int, head_size: int,
                                                       block_size: int) -> None:
    """Decode, whole prompt, decode, chunk after a prefix, chunk on a block edge, one-token chunk. float32
    only: a float64 signature costs a second compile of the fused kernel (9 s cold), and its float64 parts
    (the attention kernel, the rotation) are tested as they are in test_cpu_attention / test_cpu_elementwise."""
    case = make_case([1, 7, 40, 21, 12, 3], [1, 7, 1, 9, 8, 1], num_kv_heads, group, head_size, block_size,
                     torch.float32, "cpu", seed=group * 10 + block_size)
    _check(case, seed=group)


def test_random_layouts_match_the_reference_composition() -> None:
    """Random batches: 1-9 sequences of 1-70 tokens, each a decode row, a whole prompt or a chunk."""
    rng = random.Random(29)
    for seed in range(6):
        seq_lens = [rng.randint(1, 70) for _ in range(rng.randint(1, 9))]
        query_lens = [rng.choice([1, n, rng.randint(1, n)]) for n in seq_lens]
        case = make_case(seq_lens, query_lens, rng.choice([1, 2]), rng.choice([1, 2, 7]), rng.choice([16, 64]),
                         rng.choice([4, 8, 16]), torch.float32, "cpu", seed=seed)
        _check(case, seed)


def test_skipped_slots_and_fallbacks_equal_the_unfused_ops() -> None:
    """Slot -1 skips the row's write (as the CPU and Triton write ops do); a strided qkv and bfloat16 go to
    the unfused ops, whose results they equal exactly; the registry's CPU set holds the fused op."""
    case = make_case([9, 30, 5], [1, 12, 5], 2, 2, 16, 4, torch.float32, "cpu", seed=3)
    qkv, cos, sin, slots = _inputs(case, seed=3)
    slots[[0, 4]] = -1
    results = []
    for rows in (qkv, torch.cat([qkv, qkv], dim=1)[:, :qkv.shape[1]]):        # contiguous, then strided
        key_cache, value_cache = case.key_cache.clone(), case.value_cache.clone()
        out = cpu_attention.qkv_attention(rows.clone(), cos, sin, key_cache, value_cache, slots, case.metadata(),
                                          case.scale)
        results.append((out, key_cache, value_cache))
    (fused, keys, values), (unfused, unfused_keys, unfused_values) = results
    assert torch.equal(keys.nan_to_num(0.0), unfused_keys.nan_to_num(0.0))
    assert torch.equal(values.nan_to_num(0.0), unfused_values.nan_to_num(0.0))
    assert torch.equal(keys[:1].isnan(), case.key_cache[:1].isnan())
    torch.testing.assert_close(fused, unfused, atol=2e-6, rtol=0)     # one kernel, q contiguous or not
    bf16 = make_case([9, 4], [1, 4], 2, 2, 16, 4, torch.bfloat16, "cpu", seed=2)
    qkv, cos, sin, slots = _inputs(bf16, seed=2)
    caches = [bf16.reference_cache() for _ in range(2)]
    got = cpu_attention.qkv_attention(qkv, cos, sin, *caches[0], slots, bf16.metadata(), bf16.scale)
    want = REFERENCE_QKV_ATTENTION(qkv, cos, sin, *caches[1], slots, bf16.metadata(), bf16.scale)
    assert torch.equal(got, want) and torch.equal(caches[0][0], caches[1][0])
    assert get_ops(torch.device("cpu")).qkv_attention is cpu_attention.qkv_attention


def test_the_threaded_call_equals_the_serial_one_bit_for_bit(monkeypatch) -> None:
    """A call large enough on a step with several torch threads splits its (row, KV head) pairs into one run
    per thread (each pair computed exactly as the serial kernel does): random layouts give the serial output
    and cache bit for bit, through the op on 2 threads and through the kernel with 3 runs (a 1-row case: more
    runs than pairs)."""
    rng = random.Random(31)
    cases = [make_case([1], [1], 1, 2, 16, 4, torch.float32, "cpu", seed=99)]
    for seed in range(4):
        seq_lens = [rng.randint(1, 70) for _ in range(rng.randint(1, 9))]
        query_lens = [rng.choice([1, n, rng.randint(1, n)]) for n in seq_lens]
        cases.append(make_case(seq_lens, query_lens, rng.choice([1, 2]), rng.choice([1, 2, 7]), 16,
                               rng.choice([4, 16]), torch.float32, "cpu", seed=seed))
    threads = torch.get_num_threads()
    try:
        for case in cases:
            qkv, cos, sin, slots = _inputs(case, 7)
            runs = {}
            for name, min_work, num_threads in (("serial", 1 << 62, 1), ("threaded", 0, 2)):
                monkeypatch.setattr(cpu_attention, "PARALLEL_MIN_WORK", min_work)
                torch.set_num_threads(num_threads)
                key_cache, value_cache = case.key_cache.clone(), case.value_cache.clone()
                out = cpu_attention.qkv_attention(qkv, cos, sin, key_cache, value_cache, slots, case.metadata(),
                                                  case.scale)
                runs[name] = (out, key_cache.nan_to_num(0.0), value_cache.nan_to_num(0.0))
            assert all(torch.equal(a, b) for a, b in zip(runs["threaded"], runs["serial"]))
            q = case.q.contiguous().numpy()
            metadata = case.metadata()
            kernel_args = (q, case.key_cache.numpy(), case.value_cache.numpy(), metadata.block_tables.numpy(),
                           metadata.seq_lens_tensor.numpy(), metadata.query_start_loc.numpy(), case.scale)
            serial, three = torch.empty_like(case.q).numpy(), torch.empty_like(case.q).numpy()
            cpu_attention._attention_kernel(*kernel_args, serial)
            cpu_attention._attention_kernel_parallel(*kernel_args, three, 3)
            assert torch.equal(torch.from_numpy(three), torch.from_numpy(serial))
    finally:
        torch.set_num_threads(threads)
