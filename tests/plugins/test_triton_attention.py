"""Triton paged attention (decode split-K and prefill / chunked prefill / mixed) against the reference op.

Runs the kernels in Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 where no
GPU is present) and compiled on a GPU. Cases from tests/helpers/paged_cases.py: ragged lengths,
block tables with holes and padding entries pointing at a never-written (NaN) block, GQA ratios
1, 2 and 7, head sizes 64 and 128, float32 and float16. Tolerances against the reference on the
same inputs: float32 1e-4 absolute (different summation order), float16 5e-3 (probabilities rounded
to fp16 before the P @ V product, as flash attention does). bf16 is checked on the GPU (tests/gpu).
"""
from __future__ import annotations

import pytest
import torch

from plugins.reference.paged_attention import paged_attention
from plugins.registry import triton_ops
from plugins.triton.attention_decode import choose_num_splits, paged_attention_decode
from plugins.triton.attention_prefill import paged_attention_prefill
from tests.helpers.paged_cases import PagedCase, make_case

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3}
SHAPES = [(num_kv_heads, group, head_size) for num_kv_heads, group in ((2, 1), (2, 2), (1, 7)) for head_size in (64, 128)]


def _reference(case: PagedCase) -> torch.Tensor:
    key_cache, value_cache = case.reference_cache()
    return paged_attention(case.q.double(), key_cache.double(), value_cache.double(), case.block_tables,
                           case.seq_lens, case.query_lens, case.scale)


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "the kernel read a slot outside its sequence (NaN)"
    torch.testing.assert_close(out.double(), ref, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_kv_heads,group,head_size", SHAPES)
def test_decode_matches_reference(num_kv_heads: int, group: int, head_size: int, dtype: torch.dtype) -> None:
    case = make_case([37, 1, 16, 9], [1, 1, 1, 1], num_kv_heads, group, head_size, 8, dtype, DEVICE,
                     seed=head_size + group)
    ref = _reference(case)
    seq_lens = case.metadata().seq_lens_tensor
    for num_splits in (None, 1, 3):          # None: the heuristic; 3 splits of a 48-token table: ragged splits
        out = paged_attention_decode(case.q, case.key_cache, case.value_cache, case.block_tables, seq_lens,
                                     case.scale, num_splits=num_splits)
        _close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_kv_heads,group,head_size", SHAPES)
def test_prefill_and_mixed_match_reference(num_kv_heads: int, group: int, head_size: int,
                                           dtype: torch.dtype) -> None:
    """One batch: a whole prompt, a chunk after a cached prefix, a decode row, a chunk of one token."""
    case = make_case([21, 30, 12, 7], [21, 11, 1, 1], num_kv_heads, group, head_size, 4, dtype, DEVICE,
                     seed=3 * head_size + group)
    out = triton_ops().paged_attention_meta(case.q, case.key_cache, case.value_cache, case.metadata(), case.scale)
    _close(out, _reference(case), dtype)


def test_list_signature_and_decode_dispatch() -> None:
    """The op's host-list entry point equals its metadata entry point, for a decode-only batch too."""
    ops = triton_ops()
    for query_lens, seq_lens in (([1, 1, 1], [5, 40, 17]), ([6, 1, 3], [6, 40, 17])):
        case = make_case(seq_lens, query_lens, 2, 2, 64, 16, torch.float32, DEVICE, seed=len(query_lens))
        by_lists = ops.paged_attention(case.q, case.key_cache, case.value_cache, case.block_tables, case.seq_lens,
                                       case.query_lens, case.scale)
        by_metadata = ops.paged_attention_meta(case.q, case.key_cache, case.value_cache, case.metadata(),
                                               case.scale)
        torch.testing.assert_close(by_lists, by_metadata, atol=0, rtol=0)
        _close(by_lists, _reference(case), torch.float32)


def test_padding_rows_attend_to_nothing() -> None:
    """Rows with seq_len 0 (the padding of a CUDA-graph batch) give zeros and leave the real rows alone."""
    case = make_case([13, 6], [1, 1], 2, 2, 64, 4, torch.float32, DEVICE, seed=11)
    tables = torch.cat([case.block_tables, case.block_tables[:1]])
    q = torch.cat([case.q, torch.randn_like(case.q[:1])])
    seq_lens = torch.tensor([13, 6, 0], dtype=torch.int32, device=DEVICE)
    for num_splits in (1, 2):
        out = paged_attention_decode(q, case.key_cache, case.value_cache, tables, seq_lens, case.scale,
                                     num_splits=num_splits)
        assert torch.equal(out[2], torch.zeros_like(out[2]))
        _close(out[:2], _reference(case), torch.float32)


def test_split_count_depends_on_static_shapes_only() -> None:
    assert choose_num_splits(num_seqs=1, num_kv_heads=2, max_context=16384, num_sms=132) == 64
    assert choose_num_splits(num_seqs=64, num_kv_heads=2, max_context=16384, num_sms=132) == 3
    assert choose_num_splits(num_seqs=1, num_kv_heads=2, max_context=100, num_sms=132) == 1


def test_both_kernels_refuse_caches_q_does_not_fit() -> None:
    """Checked before any launch: a head size or KV-head count q does not fit, a non-contiguous cache."""
    case = make_case([5, 3], [1, 1], 2, 2, 64, 4, torch.float32, DEVICE, seed=5)
    tables, seq_lens, starts = case.block_tables, case.metadata().seq_lens_tensor, case.metadata().query_start_loc
    odd_heads, short_heads = case.q[:, :3], case.q[..., :32]
    strided = case.key_cache.transpose(1, 2).contiguous().transpose(1, 2)
    for q, key_cache, match in ((odd_heads, case.key_cache, "do not fit"), (short_heads, case.key_cache, "do not fit"),
                                (case.q, strided, "must be contiguous")):
        with pytest.raises(ValueError, match=match):
            paged_attention_decode(q, key_cache, case.value_cache, tables, seq_lens, case.scale)
        with pytest.raises(ValueError, match=match):
            paged_attention_prefill(q, key_cache, case.value_cache, tables, seq_lens, starts, 1, case.scale)
