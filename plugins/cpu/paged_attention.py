"""Paged attention on CPU without copying K / V: one numba kernel reads the cache through the block table.

What it is for: the CPU implementation of the op set's `paged_attention_meta` (and
its host-list twin). Every query row of every sequence, prefill chunk or decode
token alike, walks its own context block by block straight out of the paged cache
(block table[p // block_size], offset p % block_size) with an online softmax
(running max, running sum, rescaled accumulator), so no step gathers a
sequence's context into a padded tensor, no mask is built, and there is no
Python loop over sequences: one compiled call per layer over (query row, KV
head) pairs; the `group` query heads that share a KV head read each key once. Sums run in float32 (float64 for a float64 cache).
Semantics are plugins/reference/paged_attention.py's; tests/plugins/test_cpu_attention.py
compares the two. float32 / float64 caches only: other dtypes (numba has no
bfloat16) go to the reference op.
`write_kv_cache` is one compiled call too (rows to their slots; slot -1 skips the row, as the
Triton op does; a slot past the cache raises IndexError), for float and one-byte caches.
Not for: CUDA (plugins/triton), the one-byte KV cache's attention (runtime/executor/kv_quant.py).
"""
from __future__ import annotations

import math

import numba
import numpy as np
import torch

from plugins.attention_metadata import AttentionMetadata
from plugins.reference import paged_attention as reference

KERNEL_DTYPES = (torch.float32, torch.float64)
WRITE_DTYPES = (torch.float32, torch.float64, torch.int8, torch.uint8)     # the write copies elements: any numpy type


# Serial: on 2 cores a parallel launch costs more than a decode step's attention and fights torch's
# threads; reassociation lets LLVM vectorise the dot products (no nnan / ninf: the running max starts at -inf).
@numba.njit(fastmath={"reassoc", "contract", "arcp", "nsz"}, cache=True, nogil=True)
def _attention_kernel(q: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray, block_tables: np.ndarray,
                      seq_lens: np.ndarray, query_start_loc: np.ndarray, scale: float,
                      out: np.ndarray) -> None:  # pragma: no cover - compiled
    num_tokens, num_heads, head_size = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    # one set of scratch arrays for the whole call, reset per (row, KV head)
    running_max = np.empty(group, dtype=out.dtype)
    running_sum = np.empty(group, dtype=out.dtype)
    acc = np.empty((group, head_size), dtype=out.dtype)
    scores = np.empty((group, block_size), dtype=out.dtype)
    for item in range(num_tokens * num_kv_heads):
        row, kv_head = item // num_kv_heads, item % num_kv_heads
        seq = np.searchsorted(query_start_loc[1:num_seqs + 1], row, side="right")
        query_len = query_start_loc[seq + 1] - query_start_loc[seq]
        visible = seq_lens[seq] - query_len + (row - query_start_loc[seq]) + 1   # causal: keys [0, visible)
        first_head = kv_head * group
        running_max[:] = -np.inf
        running_sum[:] = 0.0
        acc[:] = 0.0
        for first in range(0, visible, block_size):
            block = block_tables[seq, first // block_size]
            num_keys = min(block_size, visible - first)
            for h in range(group):
                block_max = -np.inf
                for j in range(num_keys):
                    dot = 0.0
                    for d in range(head_size):
                        dot += q[row, first_head + h, d] * key_cache[block, j, kv_head, d]
                    dot *= scale
                    scores[h, j] = dot
                    block_max = max(block_max, dot)
                new_max = max(running_max[h], block_max)
                correction = math.exp(running_max[h] - new_max)
                running_sum[h] *= correction
                for d in range(head_size):
                    acc[h, d] *= correction
                for j in range(num_keys):
                    weight = math.exp(scores[h, j] - new_max)
                    running_sum[h] += weight
                    for d in range(head_size):
                        acc[h, d] += weight * value_cache[block, j, kv_head, d]
                running_max[h] = new_max
        for h in range(group):
            for d in range(head_size):
                out[row, first_head + h, d] = acc[h, d] / running_sum[h]


@numba.njit(cache=True, nogil=True)
def _write_kernel(key_cache: np.ndarray, value_cache: np.ndarray, k: np.ndarray, v: np.ndarray,
                  slot_mapping: np.ndarray) -> None:  # pragma: no cover - compiled
    block_size = key_cache.shape[1]
    num_slots = key_cache.shape[0] * block_size
    for t in range(slot_mapping.shape[0]):
        slot = slot_mapping[t]
        if slot < 0:
            continue
        if slot >= num_slots:
            raise IndexError("slot_mapping: a slot lies past the end of the KV cache")
        key_cache[slot // block_size, slot % block_size] = k[t]
        value_cache[slot // block_size, slot % block_size] = v[t]


def write_kv_cache(key_cache: torch.Tensor, value_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k / v: [T, Hkv, D] (strided views allowed) into the cache at `slot_mapping` [T]; slot -1: skip the row."""
    if not (key_cache.dtype in WRITE_DTYPES and k.dtype == key_cache.dtype and v.dtype == k.dtype
            and value_cache.dtype == key_cache.dtype and key_cache.device.type == "cpu"
            and k.device.type == "cpu" and slot_mapping.device.type == "cpu"):
        reference.write_kv_cache(key_cache, value_cache, k, v, slot_mapping)
        return
    _write_kernel(key_cache.numpy(), value_cache.numpy(), k.numpy(), v.numpy(), slot_mapping.numpy())


def paged_attention_meta(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         metadata: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, D] packed by sequence (CPU, the cache's dtype); returns [T, H, D]."""
    if not _kernel_reads(q, key_cache):
        return reference.paged_attention(q, key_cache, value_cache, metadata.block_tables, metadata.seq_lens,
                                         metadata.query_lens, scale)
    return _run(q, key_cache, value_cache, metadata.block_tables, metadata.seq_lens_tensor,
                metadata.query_start_loc, scale)


def paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: list[int], query_lens: list[int], scale: float) -> torch.Tensor:
    """The reference op's signature (host lists)."""
    if not _kernel_reads(q, key_cache):
        return reference.paged_attention(q, key_cache, value_cache, block_tables, seq_lens, query_lens, scale)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return _run(q, key_cache, value_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32),
                torch.tensor(starts, dtype=torch.int32), scale)


def _kernel_reads(q: torch.Tensor, key_cache: torch.Tensor) -> bool:
    return key_cache.dtype in KERNEL_DTYPES and q.dtype == key_cache.dtype and key_cache.device.type == "cpu"


def _run(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
         seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float) -> torch.Tensor:
    rows = q.contiguous().numpy()      # contiguous: the dot products vectorise over a unit-stride head
    out = np.empty(rows.shape, rows.dtype)
    if rows.shape[0]:
        _attention_kernel(rows, key_cache.numpy(), value_cache.numpy(), block_tables.numpy(),
                          seq_lens.numpy(), query_start_loc.numpy(), float(scale), out)
    return torch.from_numpy(out)
