"""The CPU op set (plugins/cpu) against the reference ops (plugins/reference), the semantics.

Cases from tests/helpers/paged_cases.py: ragged sequences at random blocks of a shuffled pool (holes),
table rows padded with a never-written block, every unwritten slot NaN, so a kernel that reads any slot
outside a sequence's own tokens produces NaN. Batches: decode rows, whole prompts, chunked prefill after
a cached prefix and one-token chunks, mixed in one batch; GQA ratios 1, 2 and 7; head sizes 16 and 64;
block sizes 4 and 16; random layouts over several seeds. Tolerances against the reference run in float64
on the same inputs: float32 2e-5 absolute (summation order and the online softmax), float64 1e-10.
"""
from __future__ import annotations

import random

import pytest
import torch

from plugins.cpu.paged_attention import paged_attention, paged_attention_meta
from plugins.reference.paged_attention import paged_attention as reference_attention
from plugins.registry import get_ops
from tests.helpers.paged_cases import PagedCase, make_case

TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-10}


def _reference(case: PagedCase) -> torch.Tensor:
    key_cache, value_cache = case.reference_cache()
    return reference_attention(case.q.double(), key_cache.double(), value_cache.double(), case.block_tables,
                               case.seq_lens, case.query_lens, case.scale)


def _check(case: PagedCase, dtype: torch.dtype) -> None:
    out = paged_attention_meta(case.q, case.key_cache, case.value_cache, case.metadata(), case.scale)
    assert out.shape == case.q.shape and out.dtype == dtype
    assert not out.isnan().any(), "the kernel read a slot outside its sequence (NaN)"
    torch.testing.assert_close(out.double(), _reference(case), atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_kv_heads,group,head_size,block_size", [(2, 1, 16, 4), (2, 2, 64, 16), (1, 7, 16, 4)])
def test_mixed_batch_matches_reference(num_kv_heads: int, group: int, head_size: int, block_size: int,
                                       dtype: torch.dtype) -> None:
    """Decode, whole prompt, decode, chunk after a prefix, chunk on a block edge, one-token chunk."""
    case = make_case([1, 7, 40, 21, 12, 3], [1, 7, 1, 9, 8, 1], num_kv_heads, group, head_size, block_size,
                     dtype, "cpu", seed=group * 10 + block_size)
    _check(case, dtype)


def test_random_layouts_match_reference() -> None:
    """Random batches: 1-9 sequences of 1-70 tokens, each a decode row, a whole prompt or a chunk."""
    rng = random.Random(13)
    for seed in range(12):
        seq_lens = [rng.randint(1, 70) for _ in range(rng.randint(1, 9))]
        query_lens = [rng.choice([1, n, rng.randint(1, n)]) for n in seq_lens]
        group = rng.choice([1, 2, 7])
        case = make_case(seq_lens, query_lens, rng.choice([1, 2]), group, 16, rng.choice([4, 8, 16]),
                         torch.float32, "cpu", seed=seed)
        _check(case, torch.float32)


def test_list_signature_equals_metadata_and_registry_picks_it_on_cpu() -> None:
    case = make_case([5, 40, 17], [1, 6, 1], 2, 2, 16, 8, torch.float32, "cpu", seed=4)
    by_lists = paged_attention(case.q, case.key_cache, case.value_cache, case.block_tables, case.seq_lens,
                               case.query_lens, case.scale)
    by_metadata = paged_attention_meta(case.q, case.key_cache, case.value_cache, case.metadata(), case.scale)
    assert torch.equal(by_lists, by_metadata)
    ops = get_ops(torch.device("cpu"))
    assert ops.name == "cpu" and ops.paged_attention_meta is paged_attention_meta
    assert get_ops(torch.device("cpu"), "reference").name == "reference"


def test_other_dtypes_fall_back_to_the_reference() -> None:
    """bfloat16 (no numba type): the op gives exactly the reference op's result."""
    case = make_case([9, 4], [1, 4], 2, 2, 16, 4, torch.bfloat16, "cpu", seed=2)
    key_cache, value_cache = case.reference_cache()
    out = paged_attention_meta(case.q, key_cache, value_cache, case.metadata(), case.scale)
    assert torch.equal(out, reference_attention(case.q, key_cache, value_cache, case.block_tables, case.seq_lens,
                                                case.query_lens, case.scale))



def test_float32_exponential_is_within_2e7_relative_of_exp() -> None:
    """The attention's vectorisable exp (softmax weights) on a sweep of [-100, 0] and shifted random scores."""
    import numpy as np

    from plugins.cpu.paged_attention import _exp_shifted_f32

    sweep = np.linspace(-100.0, 0.0, 200_001).astype(np.float32)
    scores = (np.random.default_rng(0).standard_normal(5000) * 30).astype(np.float32)
    for x, shift in ((sweep, np.float32(0.0)), (scores, scores.max())):
        got = x.copy()
        _exp_shifted_f32(got, shift, np.empty(x.shape[0], np.int32))
        want = np.exp((x - shift).astype(np.float64))       # of the float32 difference, as the kernel rounds it
        normal = want > 2.0 ** -125
        assert np.all(np.abs(got[normal] - want[normal]) <= 2e-7 * want[normal])
        assert np.all(got[~normal] < 2.0 ** -124)
