"""Reading a one-byte paged KV cache on CPU: one numba pass gathers the blocks a step reads and decodes them.

What it is for: the CPU implementation of the op set's `dequantize_kv_context`
(semantics and the byte table: plugins/reference/kv_dequant.py). One compiled
call per layer walks each sequence's blocks, writes the renumbered block table
and copies `table[byte]` for every element of the key and value blocks. The
table entries are copied as raw bits of their width (a float32 table as int32,
a bfloat16 one as int16), so the result is bit-identical to the reference for
every dtype, bfloat16 included (numba has no bfloat16 arithmetic, and needs
none here). tests/runtime/executor/test_quant_kv.py compares the two.
Not for: the attention math (plugins/cpu/paged_attention.py), writing the codes (runtime/executor/kv_quant.py).
"""
from __future__ import annotations

import numba
import numpy as np
import torch

from plugins.attention_metadata import AttentionMetadata
from plugins.reference.kv_dequant import context_blocks

_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}      # table element size -> integer view


@numba.njit(cache=True, nogil=True)
def _gather_decode_kernel(key_codes: np.ndarray, value_codes: np.ndarray, block_tables: np.ndarray,
                          counts: np.ndarray, table: np.ndarray, keys: np.ndarray, values: np.ndarray,
                          tables: np.ndarray) -> None:  # pragma: no cover - compiled
    row = 0
    width = key_codes.shape[1]
    for seq in range(counts.shape[0]):
        for j in range(counts[seq]):
            block = block_tables[seq, j]
            tables[seq, j] = row
            for e in range(width):
                keys[row, e] = table[key_codes[block, e]]
                values[row, e] = table[value_codes[block, e]]
            row += 1


def dequantize_kv_context(key_codes: torch.Tensor, value_codes: torch.Tensor, metadata: AttentionMetadata,
                          table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As plugins/reference/kv_dequant.py; CPU tensors."""
    num_blocks, block_size = key_codes.shape[:2]
    counts = context_blocks(metadata, block_size)
    total = sum(counts)
    keys = torch.empty((total, *key_codes.shape[1:]), dtype=table.dtype)
    values = torch.empty_like(keys)
    tables = torch.zeros(len(counts), max(counts, default=0), dtype=torch.int64)
    if total:
        bits = _BITS[table.element_size()]
        _gather_decode_kernel(key_codes.view(torch.uint8).reshape(num_blocks, -1).numpy(),
                              value_codes.view(torch.uint8).reshape(num_blocks, -1).numpy(),
                              metadata.block_tables.to(torch.int64).numpy(), np.asarray(counts, dtype=np.int64),
                              table.contiguous().view(bits).numpy(), keys.view(bits).reshape(total, -1).numpy(),
                              values.view(bits).reshape(total, -1).numpy(), tables.numpy())
    return keys, values, tables
