"""The one-byte KV cache: what the pool stores, that attention over it equals float attention over the
dequantized values, and that a fixed memory budget holds twice the blocks of bf16."""
from __future__ import annotations

import pytest
import torch

from engine_format.quant_config import QuantSpec
from plugins.registry import REFERENCE_OPS
from runtime.executor.kv_quant import dequantize_kv, paged_attention_quant, write_kv_cache_quant
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


@pytest.mark.parametrize("algo", ["INT8", "FP8"])
def test_attention_over_quantized_cache_equals_float_attention_on_dequantized_values(algo: str) -> None:
    cfg = tiny_cfg("float32", QuantSpec(None, algo))
    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    num_blocks, seq_lens, query_lens = 6, [7, 5], [1, 5]      # one decode row, one prefill chunk
    tables = torch.tensor([[4, 1], [2, 5]])
    storage = KVStorage(cfg, num_blocks, BLOCK, torch.float32, torch.device("cpu"))
    kc, vc = storage.key_caches[0], storage.value_caches[0]
    # history of sequence 0 (6 tokens) first, then this step's tokens: seq 0 position 6, seq 1 positions 0..4
    slots_hist = [4 * BLOCK + p if p < BLOCK else 1 * BLOCK + p - BLOCK for p in range(6)]
    slots_step = [1 * BLOCK + 2] + [2 * BLOCK + p if p < BLOCK else 5 * BLOCK + p - BLOCK for p in range(5)]
    scale = torch.tensor([0.1])          # int8 range +-12.7: no value of N(0, 4) clamps
    for slots in (slots_hist, slots_step):
        k = torch.randn(len(slots), kv_heads, d, generator=gen) * 2
        v = torch.randn(len(slots), kv_heads, d, generator=gen) * 2
        write_kv_cache_quant(REFERENCE_OPS, kc, vc, k, v, torch.tensor(slots), scale, algo)
    q = torch.randn(6, heads, d, generator=gen)
    got = paged_attention_quant(REFERENCE_OPS, q, kc, vc, tables, seq_lens, query_lens, d ** -0.5, scale, algo)
    ref = REFERENCE_OPS.paged_attention(q, dequantize_kv(kc, scale, algo, torch.float32),
                                        dequantize_kv(vc, scale, algo, torch.float32), tables, seq_lens, query_lens,
                                        d ** -0.5)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    stored = dequantize_kv(kc, scale, algo, torch.float32).flatten(0, 1)[torch.tensor(slots_step)]
    assert float((stored - k).abs().max()) <= (0.5 * 0.1 + 1e-6 if algo == "INT8" else 0.0625 * float(k.abs().max()))
