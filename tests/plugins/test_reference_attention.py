"""plugins/reference/paged_attention.py against a dense float64 attention written here.

Cases from tests/helpers/paged_cases.py (ragged sequences in a paged cache at blocks drawn from a
shuffled pool with holes, table rows padded with a never-written block), with the unwritten slots set
to large finite garbage instead of NaN (the reference gathers whole blocks and masks afterwards, so a
masked slot must be finite; an unmasked one shows as a large error). Queries are decode rows
(query_len 1), whole prompts and prefill chunks after a cached prefix, mixed in one batch; GQA ratios
1, 2 and 7. The dense reference reads each token's K / V by its position (block table[p // block_size],
offset p % block_size) and attends causally. Tolerances: float64 1e-10 (same maths, different
summation order), float32 2e-5 absolute on outputs of magnitude <= 3.
"""
from __future__ import annotations

import pytest
import torch

from plugins.reference.paged_attention import paged_attention, write_kv_cache
from tests.helpers.paged_cases import PagedCase, make_case

BLOCK_SIZE = 4
HEAD_SIZE = 8
NUM_KV_HEADS = 2
GARBAGE = 1e3


def garbage_case(seq_lens: list[int], query_lens: list[int], group: int, dtype: torch.dtype, seed: int) -> PagedCase:
    case = make_case(seq_lens, query_lens, NUM_KV_HEADS, group, HEAD_SIZE, BLOCK_SIZE, dtype, "cpu", seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    caches = []
    for cache in (case.key_cache, case.value_cache):
        garbage = (torch.randn(cache.shape, generator=gen, dtype=torch.float64) * GARBAGE).to(dtype)
        caches.append(torch.where(cache.isnan(), garbage, cache))
    return PagedCase(case.q, caches[0], caches[1], case.block_tables, case.seq_lens, case.query_lens, case.scale)


def token_kv(case: PagedCase, seq: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` keys / values of sequence `seq`, read slot by slot: [length, Hkv, D] float64."""
    table = case.block_tables[seq].tolist()
    slots = [(table[p // BLOCK_SIZE], p % BLOCK_SIZE) for p in range(length)]
    return (torch.stack([case.key_cache[b, o] for b, o in slots]).double(),
            torch.stack([case.value_cache[b, o] for b, o in slots]).double())


def dense_attention(case: PagedCase, scale: float) -> torch.Tensor:
    """Causal attention per sequence in float64, query head h reading KV head h // group."""
    num_heads = case.q.shape[1]
    group = num_heads // NUM_KV_HEADS
    rows, start = [], 0
    for seq, (seq_len, query_len) in enumerate(zip(case.seq_lens, case.query_lens)):
        keys, values = token_kv(case, seq, seq_len)
        for j in range(query_len):
            visible = seq_len - query_len + j + 1
            q = case.q[start + j].double()                                          # [H, D]
            out = torch.empty(num_heads, HEAD_SIZE, dtype=torch.float64)
            for h in range(num_heads):
                k, v = keys[:visible, h // group], values[:visible, h // group]     # [visible, D]
                weights = torch.softmax((k @ q[h]) * scale, dim=0)
                out[h] = weights @ v
            rows.append(out)
        start += query_len
    return torch.stack(rows)


def run(case: PagedCase, scale: float) -> torch.Tensor:
    return paged_attention(case.q, case.key_cache, case.value_cache, case.block_tables, case.seq_lens,
                           case.query_lens, scale)


CASES = {
    "mixed": ([1, 7, 13, 6, 18, 3], [1, 7, 1, 4, 5, 1]),     # decode, whole prompt, decode, chunk, chunk, decode
    "decode-ragged": ([5, 1, 17, 9, 2], [1, 1, 1, 1, 1]),
    "decode-equal": ([8, 8, 8], [1, 1, 1]),                   # the unmasked batched path
    "one-prefill": ([11], [11]),
    "chunk-at-block-edge": ([12, 9], [4, 8]),                 # a chunk that starts on a block boundary
}


@pytest.mark.parametrize("group", [1, 2, 7])
@pytest.mark.parametrize("case_name", list(CASES))
def test_paged_attention_equals_dense_float64(case_name: str, group: int) -> None:
    seq_lens, query_lens = CASES[case_name]
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        case = garbage_case(seq_lens, query_lens, group, dtype, seed=group * 100 + len(case_name))
        got = run(case, case.scale)
        assert got.shape == case.q.shape and got.dtype == dtype
        err = (got.double() - dense_attention(case, case.scale)).abs().max().item()
        assert err <= tol, f"{case_name}, group {group}, {dtype}: max abs error {err:.3g} > {tol}"


def test_paged_attention_reads_only_its_own_slots() -> None:
    """Rewriting every slot outside the sequences' tokens (other finite values) leaves the output bit-identical."""
    case = garbage_case([6, 10, 3], [1, 4, 3], 2, torch.float32, seed=3)
    before = run(case, 0.3)
    used = torch.zeros(case.key_cache.shape[:2], dtype=torch.bool)
    for seq, n in enumerate(case.seq_lens):
        table = case.block_tables[seq].tolist()
        for p in range(n):
            used[table[p // BLOCK_SIZE], p % BLOCK_SIZE] = True
    key_cache, value_cache = case.key_cache.clone(), case.value_cache.clone()
    key_cache[~used], value_cache[~used] = -7.0, 1e4
    after = run(PagedCase(case.q, key_cache, value_cache, case.block_tables, case.seq_lens, case.query_lens,
                          case.scale), 0.3)
    assert torch.equal(before, after)


def test_paged_attention_applies_the_scale() -> None:
    case = garbage_case([9, 4], [1, 2], 1, torch.float64, seed=5)
    for scale in (0.05, 1.0):
        assert torch.allclose(run(case, scale), dense_attention(case, scale), atol=1e-10, rtol=0)


def test_write_kv_cache_places_token_by_slot() -> None:
    key_cache = torch.zeros(24, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
    value_cache = torch.zeros_like(key_cache)
    k = torch.randn(3, NUM_KV_HEADS, HEAD_SIZE)
    v = torch.randn(3, NUM_KV_HEADS, HEAD_SIZE)
    slots = torch.tensor([5 * BLOCK_SIZE + 3, 0, 17 * BLOCK_SIZE + 1])
    write_kv_cache(key_cache, value_cache, k, v, slots)
    for i, (block, offset) in enumerate([(5, 3), (0, 0), (17, 1)]):
        assert torch.equal(key_cache[block, offset], k[i]) and torch.equal(value_cache[block, offset], v[i])
    assert int((key_cache != 0).any(-1).any(-1).sum()) == 3     # nothing else written
