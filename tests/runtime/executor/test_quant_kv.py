"""The one-byte KV cache: what the pool stores, that a fixed memory budget holds twice the blocks of bf16,
that each layer's byte table decodes every byte exactly as `dequantize_kv`, that the CPU op decoding a step's
blocks is bit-identical to the reference op, and that attention over the quantized cache equals float64
attention over the dequantized pool on random block layouts (tolerance 2e-6 absolute in float32: accumulation
order and float32 rounding of softmax and sums; the decoded values themselves are exact)."""
from __future__ import annotations

import pytest
import torch

from engine_format.quant_config import QuantSpec
from plugins.attention_metadata import AttentionMetadata
from plugins.registry import REFERENCE_OPS, OpSet, cpu_ops
from runtime.executor.kv_quant import (dequantize_kv, kv_byte_table, kv_byte_tables, paged_attention_quant,
                                       write_kv_cache_quant)
from runtime.executor.kv_storage import KVStorage, bytes_per_block
from tests.helpers.quant import tiny_cfg

BLOCK = 4


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_pool_is_one_byte_and_twice_bf16_blocks(kv: str) -> None:
    cfg = tiny_cfg("bfloat16", QuantSpec.for_modes(None, kv), layers=2)
    storage = KVStorage(cfg, 8, BLOCK, torch.bfloat16, torch.device("cpu"))
    assert storage.key_caches[0].element_size() == 1 and storage.value_caches[1].element_size() == 1
    quant, bf16 = bytes_per_block(cfg, BLOCK, torch.bfloat16), bytes_per_block(tiny_cfg("bfloat16", layers=2),
                                                                              BLOCK, torch.bfloat16)
    assert quant * 2 == bf16
    budget = 1 << 20
    assert budget // quant == 2 * (budget // bf16)
    assert sum(t.nbytes for t in storage.key_caches + storage.value_caches) == 8 * quant


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("algo", ["INT8", "FP8"])
def test_byte_table_decodes_every_byte_as_dequantize_kv(algo: str, dtype: torch.dtype) -> None:
    scale = torch.tensor([0.037])
    table = kv_byte_table(scale, algo, dtype)
    codes = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    expected = dequantize_kv(codes.view(torch.int8) if algo == "INT8" else codes, scale, algo, dtype)
    assert table.dtype == dtype and table.shape == (256,)
    assert torch.equal(table.isnan(), expected.isnan()) and int(table.isnan().sum()) == (2 if algo == "FP8" else 0)
    assert torch.equal(table[~table.isnan()], expected[~expected.isnan()])
    cfg = tiny_cfg("float32", QuantSpec(None, algo), layers=2)
    weights = {f"transformer.layers.{i}.attention.kv_cache_scaling_factor": torch.tensor([0.1 * (i + 1)])
               for i in range(2)}
    tables = kv_byte_tables(cfg, weights, torch.float32)
    assert [float(t[1]) for t in tables] == pytest.approx([0.1, 0.2] if algo == "INT8" else [0.1 * 2 ** -9,
                                                                                            0.2 * 2 ** -9])
    assert kv_byte_tables(tiny_cfg("float32"), weights, torch.float32) == []


def random_layout(gen: torch.Generator, num_blocks: int, seq_lens: list[int]) -> torch.Tensor:
    """Block tables [B, max blocks]: each sequence's blocks drawn at random from the pool, no block owned
    twice, except that sequence 1 shares sequence 0's first block (a cached prefix) when both have one;
    columns past a sequence's blocks hold 0 (unused)."""
    counts = [-(-n // BLOCK) for n in seq_lens]
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(seq_lens), max(counts), dtype=torch.int64)
    for i, count in enumerate(counts):
        for j in range(count):
            tables[i, j] = free.pop()
    if len(counts) > 1 and counts[0] and counts[1]:
        tables[1, 0] = tables[0, 0]
    return tables


def fill(gen: torch.Generator, cfg, tables: torch.Tensor, seq_lens: list[int], algo: str, scale: torch.Tensor,
         num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-byte pool holding every sequence's tokens at the slots its block table gives."""
    storage = KVStorage(cfg, num_blocks, BLOCK, torch.float32, torch.device("cpu"))
    kc, vc = storage.key_caches[0], storage.value_caches[0]
    slots = [int(tables[i, p // BLOCK]) * BLOCK + p % BLOCK for i, n in enumerate(seq_lens) for p in range(n)
             if not (i == 1 and p < BLOCK and tables[1, 0] == tables[0, 0])]        # the shared block: once
    k = torch.randn(len(slots), cfg.num_key_value_heads, cfg.head_size, generator=gen) * 2
    v = torch.randn(len(slots), cfg.num_key_value_heads, cfg.head_size, generator=gen) * 2
    write_kv_cache_quant(REFERENCE_OPS, kc, vc, k, v, torch.tensor(slots), scale, algo)
    return kc, vc


LAYOUTS = [([7, 5], [1, 5]),                     # one decode row, one prefill chunk over a fresh sequence
           ([13, 9, 1, 4], [1, 3, 1, 4]),        # decode rows, a chunk after a cached prefix, a 1-token sequence
           ([32, 17, 20], [1, 1, 1])]            # decode only, several blocks each


@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
@pytest.mark.parametrize("algo", ["INT8", "FP8"])
@pytest.mark.parametrize("ops", [REFERENCE_OPS, cpu_ops()], ids=["reference", "cpu"])
def test_attention_over_quantized_cache_equals_float64_attention(ops: OpSet, algo: str, layout: int) -> None:
    cfg = tiny_cfg("float32", QuantSpec(None, algo))
    gen = torch.Generator().manual_seed(layout)
    seq_lens, query_lens = LAYOUTS[layout]
    num_blocks = sum(-(-n // BLOCK) for n in seq_lens) + 5
    tables = random_layout(gen, num_blocks, seq_lens)
    scale = torch.tensor([0.1])          # int8 range +-12.7: no value of N(0, 4) clamps
    kc, vc = fill(gen, cfg, tables, seq_lens, algo, scale, num_blocks)
    q = torch.randn(sum(query_lens), cfg.num_attention_heads, cfg.head_size, generator=gen)
    metadata = AttentionMetadata.build(tables, seq_lens, query_lens, torch.device("cpu"))
    d = cfg.head_size
    got = paged_attention_quant(ops, q, kc, vc, metadata, d ** -0.5, kv_byte_table(scale, algo, torch.float32))
    ref = REFERENCE_OPS.paged_attention(q.double(), dequantize_kv(kc, scale, algo, torch.float64),
                                        dequantize_kv(vc, scale, algo, torch.float64), tables, seq_lens, query_lens,
                                        d ** -0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("algo", ["INT8", "FP8"])
def test_cpu_decode_of_the_context_is_bit_identical_to_the_reference(algo: str, dtype: torch.dtype) -> None:
    cfg = tiny_cfg("float32", QuantSpec(None, algo))
    gen = torch.Generator().manual_seed(7)
    seq_lens, query_lens = [13, 9, 0, 4], [1, 3, 0, 4]        # a padding row (0 tokens) reads no block
    num_blocks = 12
    tables = random_layout(gen, num_blocks, [max(n, 1) for n in seq_lens])
    kc, vc = fill(gen, cfg, tables, seq_lens, algo, torch.tensor([0.05]), num_blocks)
    metadata = AttentionMetadata.build(tables, seq_lens, query_lens, torch.device("cpu"))
    table = kv_byte_table(torch.tensor([0.05]), algo, dtype)
    ref = REFERENCE_OPS.dequantize_kv_context(kc, vc, metadata, table)
    got = cpu_ops().dequantize_kv_context(kc, vc, metadata, table)
    assert ref[0].shape == (4 + 3 + 0 + 1, BLOCK, cfg.num_key_value_heads, cfg.head_size) and ref[0].dtype == dtype
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and torch.equal(a, b)
    decoded = dequantize_kv(kc, torch.tensor([0.05]), algo, dtype)
    assert torch.equal(ref[0][int(ref[2][1, 2])], decoded[int(tables[1, 2])])


@pytest.mark.parametrize("algo", ["INT8", "FP8"])
def test_stored_values_are_within_one_step_of_the_written_ones(algo: str) -> None:
    cfg = tiny_cfg("float32", QuantSpec(None, algo))
    gen = torch.Generator().manual_seed(1)
    storage = KVStorage(cfg, 2, BLOCK, torch.float32, torch.device("cpu"))
    kc, vc = storage.key_caches[0], storage.value_caches[0]
    k = torch.randn(2 * BLOCK, cfg.num_key_value_heads, cfg.head_size, generator=gen) * 2
    scale = torch.tensor([0.1])
    write_kv_cache_quant(REFERENCE_OPS, kc, vc, k, k, torch.arange(2 * BLOCK), scale, algo)
    stored = dequantize_kv(kc, scale, algo, torch.float32).flatten(0, 1)
    assert float((stored - k).abs().max()) <= (0.5 * 0.1 + 1e-6 if algo == "INT8" else 0.0625 * float(k.abs().max()))
