"""Paged attention on CPU without copying K / V: one numba kernel reads the cache through the block table.

What it is for: the CPU implementation of the op set's `paged_attention_meta` (and
its host-list twin). Every query row of every sequence, prefill chunk or decode
token alike, walks its own context block by block straight out of the paged cache
(block table[p // block_size], offset p % block_size): scores over the whole context,
an exact softmax (max, exp, sum), then the weighted values, so no step gathers a
sequence's context into a padded tensor, no mask is built, and there is no
Python loop over sequences: one compiled call per layer over (query row, KV
head) pairs; the `group` query heads that share a KV head read each key once. Sums run in the cache's
dtype; float32 exponentials use a vectorisable polynomial (`_exp_shifted_f32`, within 1e-7 relative).
`qkv_attention` (the op set's fused op) runs RoPE, the KV write and this attention in one compiled call
on the qkv projection's rows.
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
from plugins.cpu import rope as cpu_rope
from plugins.cpu import use_step_threads
from plugins.cpu.prefetch import prefetch_l2
from plugins.reference import paged_attention as reference
from plugins.reference.qkv_attention import UnfusedQKVAttention

KERNEL_DTYPES = (torch.float32, torch.float64)
# Smallest call (rows x heads x head size x longest context) split over the threads; see _parallel. Measured
# (2 threads against 1, kernel calls alone, quiet): tiny-qwen2's decode at 16 rows, context 16 / 100 / 160
# (work 1.6e4 / 1.0e5 / 1.6e5): 13.4 -> 8.5, 49.4 -> 27.0, 70.1 -> 38.1 us; 4 rows, context 64 (1.6e4) 8.4 -> 6.7;
# 1 row, context 128 (8e3) equal. The step's thread policy already keeps a served step that is too small to
# split on one thread (runtime/core/thread_policy.py); this bound only skips calls the launch would outweigh.
PARALLEL_MIN_WORK = 1 << 14
WRITE_DTYPES = (torch.float32, torch.float64, torch.int8, torch.uint8)     # the write copies elements: any numpy type
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


# Reassociation lets LLVM vectorise the dot products and sums. No nnan / ninf. Every sum and product runs in
# the cache's dtype (a float64 literal would promote float32 sums to float64 and keep LLVM from vectorising
# them: measured 2x slower at [16 rows, 8 heads, 96 keys, 64]).
@numba.njit(fastmath={"reassoc", "contract", "arcp", "nsz"}, error_model="numpy", cache=True, nogil=True)
def _attend(item: int, q: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray, block_tables: np.ndarray,
            seq_lens: np.ndarray, query_start_loc: np.ndarray, scale: float, out: np.ndarray, scores: np.ndarray,
            exponents: np.ndarray, acc: np.ndarray, row_max: np.ndarray,
            total: np.ndarray) -> None:  # pragma: no cover - compiled
    """One (query row, KV head) pair: its `group` query heads over the row's causal context, into `out`; the
    other arrays are scratch (scores [group, longest context], ...)."""
    num_heads, head_size = q.shape[1], q.shape[2]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    zero, scale = out.dtype.type(0.0), out.dtype.type(scale)
    poly_exp = out.itemsize == 4         # float32: the vectorisable exp; float64: math.exp
    row, kv_head = item // num_kv_heads, item % num_kv_heads
    seq = np.searchsorted(query_start_loc[1:num_seqs + 1], row, side="right")
    query_len = query_start_loc[seq + 1] - query_start_loc[seq]
    visible = seq_lens[seq] - query_len + (row - query_start_loc[seq]) + 1   # causal: keys [0, visible)
    first_head = kv_head * group
    row_max[:] = -np.inf
    # scores q . k: each key read once per group; four keys at a time (four independent sums)
    for first in range(0, visible, block_size):
        block = block_tables[seq, first // block_size]
        num_keys = min(block_size, visible - first)
        _prefetch_block(value_cache, block, num_keys, kv_head)      # for the weighted sum below
        if first + block_size < visible:
            _prefetch_block(key_cache, block_tables[seq, first // block_size + 1],
                            min(block_size, visible - first - block_size), kv_head)
        for h in range(group):
            head = first_head + h
            j = 0
            while j < num_keys:
                if j + 4 <= num_keys:
                    s0, s1, s2, s3 = zero, zero, zero, zero
                    for d in range(head_size):
                        x = q[row, head, d]
                        s0 += x * key_cache[block, j, kv_head, d]
                        s1 += x * key_cache[block, j + 1, kv_head, d]
                        s2 += x * key_cache[block, j + 2, kv_head, d]
                        s3 += x * key_cache[block, j + 3, kv_head, d]
                    scores[h, first + j], scores[h, first + j + 1] = s0 * scale, s1 * scale
                    scores[h, first + j + 2], scores[h, first + j + 3] = s2 * scale, s3 * scale
                    row_max[h] = max(row_max[h], max(max(s0, s1), max(s2, s3)) * scale)
                    j += 4
                else:
                    s0 = zero
                    for d in range(head_size):
                        s0 += q[row, head, d] * key_cache[block, j, kv_head, d]
                    scores[h, first + j] = s0 * scale
                    row_max[h] = max(row_max[h], s0 * scale)
                    j += 1
    for h in range(group):      # exact softmax weights, unnormalised: the output is divided by their sum
        if poly_exp:
            _exp_shifted_f32(scores[h, :visible], row_max[h], exponents)
        else:
            for p in range(visible):
                scores[h, p] = math.exp(scores[h, p] - row_max[h])
        weight_sum = zero
        for p in range(visible):
            weight_sum += scores[h, p]
        total[h] = weight_sum
    acc[:] = zero
    for first in range(0, visible, block_size):         # the weighted sum of the values, four at a time
        block = block_tables[seq, first // block_size]
        num_keys = min(block_size, visible - first)
        for h in range(group):
            j = 0
            while j < num_keys:
                if j + 4 <= num_keys:
                    w0, w1 = scores[h, first + j], scores[h, first + j + 1]
                    w2, w3 = scores[h, first + j + 2], scores[h, first + j + 3]
                    for d in range(head_size):
                        acc[h, d] += (w0 * value_cache[block, j, kv_head, d]
                                      + w1 * value_cache[block, j + 1, kv_head, d]
                                      + w2 * value_cache[block, j + 2, kv_head, d]
                                      + w3 * value_cache[block, j + 3, kv_head, d])
                    j += 4
                else:
                    w0 = scores[h, first + j]
                    for d in range(head_size):
                        acc[h, d] += w0 * value_cache[block, j, kv_head, d]
                    j += 1
    for h in range(group):
        inverse = 1 / total[h]
        for d in range(head_size):
            out[row, first_head + h, d] = acc[h, d] * inverse


@numba.njit(cache=True, nogil=True)
def _prefetch_block(cache: np.ndarray, block: int, num_keys: int, kv_head: int) -> None:  # pragma: no cover
    """Prefetch the first `num_keys` keys (or values) of one KV head in one cache block into L2."""
    block_size, num_kv_heads, head_size = cache.shape[1], cache.shape[2], cache.shape[3]
    line = 64 // cache.itemsize
    for j in range(num_keys):
        start = ((block * block_size + j) * num_kv_heads + kv_head) * head_size
        for element in range(start, start + head_size, line):
            prefetch_l2(cache, element)


@numba.njit(cache=True, nogil=True)
def _scratch(q: np.ndarray, key_cache: np.ndarray, seq_lens: np.ndarray, out: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """Scratch for `_attend` calls: each row's scores over its whole context, ..."""
    group, head_size = q.shape[1] // key_cache.shape[2], q.shape[2]
    longest = max(seq_lens.max(), 1)
    return (np.empty((group, longest), dtype=out.dtype), np.empty(longest, dtype=np.int32),
            np.empty((group, head_size), dtype=out.dtype), np.empty(group, dtype=out.dtype),
            np.empty(group, dtype=out.dtype))


@numba.njit(cache=True, nogil=True)
def _attention_kernel(q: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray, block_tables: np.ndarray,
                      seq_lens: np.ndarray, query_start_loc: np.ndarray, scale: float,
                      out: np.ndarray) -> None:  # pragma: no cover - compiled
    """Every (query row, KV head) pair on this thread, one set of scratch arrays for the whole call."""
    scores, exponents, acc, row_max, total = _scratch(q, key_cache, seq_lens, out)
    for item in range(q.shape[0] * key_cache.shape[2]):
        _attend(item, q, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, out, scores,
                exponents, acc, row_max, total)


# The same pairs split into one contiguous run per thread (numba's threads: the OpenMP pool torch uses); each
# pair is computed exactly as the serial kernel computes it, so the output is bit-identical. Used only where the
# step already runs on several threads and the call is large (`PARALLEL_MIN_WORK`): a launch costs more than a
# small call's work.
@numba.njit(parallel=True, cache=True, nogil=True)
def _attention_kernel_parallel(q: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray,
                               block_tables: np.ndarray, seq_lens: np.ndarray, query_start_loc: np.ndarray,
                               scale: float, out: np.ndarray, threads: int) -> None:  # pragma: no cover - compiled
    num_items = q.shape[0] * key_cache.shape[2]
    num_runs = min(threads, num_items)
    for run in numba.prange(num_runs):
        scores, exponents, acc, row_max, total = _scratch(q, key_cache, seq_lens, out)
        for item in range(run * num_items // num_runs, (run + 1) * num_items // num_runs):
            _attend(item, q, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, out,
                    scores, exponents, acc, row_max, total)


# No reassociation here: it could fold the two-part ln 2 subtraction (Cody-Waite) into one and lose its precision.
@numba.njit(fastmath={"contract"}, error_model="numpy", cache=True, nogil=True)
def _exp_shifted_f32(x: np.ndarray, shift: float, exponents: np.ndarray) -> None:  # pragma: no cover - compiled
    """x[i] = exp(x[i] - shift) in place, for float32 x[i] <= shift (softmax), in loops LLVM vectorises (math.exp
    is a scalar libm call): x - shift = n ln 2 + r with |r| <= ln 2 / 2, exp(r) by Cephes' degree-7 expf
    polynomial, 2^n written into the float32 exponent bits. Within 1e-7 relative of exp; below -87 (exp < 2^-125)
    the result is 2^-125-ish rather than 0, which no softmax weight notices."""
    f32 = x.dtype.type
    powers = exponents.view(x.dtype)
    for i in range(x.shape[0]):
        v = max(x[i] - shift, f32(-87.0))
        n = math.floor(v * f32(1.44269504) + f32(0.5))
        r = v - n * f32(0.693359375) + n * f32(2.12194440e-4)
        p = f32(1.9875691500e-4)
        p = p * r + f32(1.3981999507e-3)
        p = p * r + f32(8.3334519073e-3)
        p = p * r + f32(4.1665795894e-2)
        p = p * r + f32(1.6666665459e-1)
        p = p * r + f32(5.0000001201e-1)
        x[i] = p * r * r + r + f32(1.0)
        exponents[i] = (np.int32(n) + np.int32(127)) << np.int32(23)
    for i in range(x.shape[0]):
        x[i] *= powers[i]


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


@numba.njit(cache=True, nogil=True)
def _rope_write_kernel(qkv: np.ndarray, cos: np.ndarray, sin: np.ndarray, key_cache: np.ndarray,
                       value_cache: np.ndarray, slot_mapping: np.ndarray,
                       q_out: np.ndarray) -> None:  # pragma: no cover - compiled
    """qkv [T, (H + 2 Hkv) D] (one qkv projection's rows): q rotated into q_out [T, H, D], k rotated and v
    copied into their slots. Each rotated element is computed as plugins/cpu/rope.py computes it (no fused
    multiply-add), so it equals the reference's bit for bit."""
    num_tokens, num_heads, head_size = q_out.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    half = head_size // 2
    num_slots = key_cache.shape[0] * block_size
    k_first, v_first = num_heads * head_size, (num_heads + num_kv_heads) * head_size
    for t in range(num_tokens):
        for h in range(num_heads):
            first = h * head_size
            for d in range(half):
                x1, x2 = qkv[t, first + d], qkv[t, first + d + half]
                q_out[t, h, d] = x1 * cos[t, d] - x2 * sin[t, d]
                q_out[t, h, d + half] = x2 * cos[t, d + half] + x1 * sin[t, d + half]
        slot = slot_mapping[t]
        if slot < 0:
            continue
        if slot >= num_slots:
            raise IndexError("slot_mapping: a slot lies past the end of the KV cache")
        block, offset = slot // block_size, slot % block_size
        for h in range(num_kv_heads):
            first = k_first + h * head_size
            for d in range(half):
                x1, x2 = qkv[t, first + d], qkv[t, first + d + half]
                key_cache[block, offset, h, d] = x1 * cos[t, d] - x2 * sin[t, d]
                key_cache[block, offset, h, d + half] = x2 * cos[t, d + half] + x1 * sin[t, d + half]
            first = v_first + h * head_size
            for d in range(head_size):
                value_cache[block, offset, h, d] = qkv[t, first + d]


@numba.njit(cache=True, nogil=True)
def _qkv_attention_kernel(qkv: np.ndarray, cos: np.ndarray, sin: np.ndarray, key_cache: np.ndarray,
                          value_cache: np.ndarray, slot_mapping: np.ndarray, block_tables: np.ndarray,
                          seq_lens: np.ndarray, query_start_loc: np.ndarray, scale: float, q_rows: np.ndarray,
                          out: np.ndarray) -> None:  # pragma: no cover - compiled
    """Every row's k / v written before any row attends: a prefill chunk's rows see each other's keys."""
    _rope_write_kernel(qkv, cos, sin, key_cache, value_cache, slot_mapping, q_rows)
    _attention_kernel(q_rows, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, out)


def _parallel(num_rows: int, num_heads: int, head_size: int, metadata: AttentionMetadata) -> bool:
    """Run the call on torch's threads: the step already uses several and the call is large (its work bound:
    rows x heads x head size x the longest context, at least PARALLEL_MIN_WORK)."""
    return (torch.get_num_threads() > 1
            and num_rows * num_heads * head_size * max(metadata.seq_lens, default=0) >= PARALLEL_MIN_WORK)


def qkv_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_cache: torch.Tensor,
                  value_cache: torch.Tensor, slot_mapping: torch.Tensor, metadata: AttentionMetadata,
                  scale: float) -> torch.Tensor:
    """The op set's fused `qkv_attention` (semantics: plugins/reference/qkv_attention.py): RoPE, the KV
    write and paged attention in one compiled call reading q / k / v straight out of the qkv projection's
    rows, with no split, no q copy and no per-op conversions. Inputs the kernels cannot read (other dtypes,
    other devices, strided rows) go to the composition of the unfused CPU ops, which picks its own fallbacks."""
    num_kv_heads, head_size = key_cache.shape[2], key_cache.shape[3]
    num_heads = qkv.shape[1] // head_size - 2 * num_kv_heads
    if not (qkv.is_cpu and key_cache.is_cpu and key_cache.dtype in KERNEL_DTYPES and qkv.dtype == key_cache.dtype
            and value_cache.dtype == key_cache.dtype and cos.dtype == qkv.dtype and sin.dtype == qkv.dtype
            and qkv.is_contiguous() and cos.shape == (qkv.shape[0], head_size) and sin.shape == cos.shape
            and head_size % 2 == 0 and num_heads > 0 and num_heads % num_kv_heads == 0):
        return _UNFUSED(qkv, cos, sin, key_cache, value_cache, slot_mapping, metadata, scale)
    num_tokens = qkv.shape[0]
    q_rows = np.empty((num_tokens, num_heads, head_size), _NUMPY_DTYPES[qkv.dtype])
    out = np.empty((num_tokens, num_heads * head_size), q_rows.dtype)
    if num_tokens and _parallel(num_tokens, num_heads, head_size, metadata):
        _rope_write_kernel(qkv.numpy(), cos.numpy(), sin.numpy(), key_cache.numpy(), value_cache.numpy(),
                           slot_mapping.numpy(), q_rows)
        threads = use_step_threads()
        _attention_kernel_parallel(q_rows, key_cache.numpy(), value_cache.numpy(), metadata.block_tables.numpy(),
                                   metadata.seq_lens_tensor.numpy(), metadata.query_start_loc.numpy(), float(scale),
                                   out.reshape(num_tokens, num_heads, head_size), threads)
    elif num_tokens:
        _qkv_attention_kernel(qkv.numpy(), cos.numpy(), sin.numpy(), key_cache.numpy(), value_cache.numpy(),
                              slot_mapping.numpy(), metadata.block_tables.numpy(), metadata.seq_lens_tensor.numpy(),
                              metadata.query_start_loc.numpy(), float(scale), q_rows,
                              out.reshape(num_tokens, num_heads, head_size))
    return torch.from_numpy(out)


def write_kv_cache(key_cache: torch.Tensor, value_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k / v: [T, Hkv, D] (strided views allowed) into the cache at `slot_mapping` [T]; slot -1: skip the row."""
    if not (key_cache.dtype in WRITE_DTYPES and k.dtype == key_cache.dtype and v.dtype == k.dtype
            and value_cache.dtype == key_cache.dtype and key_cache.is_cpu
            and k.is_cpu and slot_mapping.is_cpu):
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
    return key_cache.dtype in KERNEL_DTYPES and q.dtype == key_cache.dtype and key_cache.is_cpu


def _run(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
         seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float) -> torch.Tensor:
    rows = q.contiguous().numpy()      # contiguous: the dot products vectorise over a unit-stride head
    out = np.empty(rows.shape, rows.dtype)
    if rows.shape[0]:
        _attention_kernel(rows, key_cache.numpy(), value_cache.numpy(), block_tables.numpy(),
                          seq_lens.numpy(), query_start_loc.numpy(), float(scale), out)
    return torch.from_numpy(out)


# qkv_attention's fallback: the unfused CPU ops (each falls back to the reference where its kernel cannot read)
_UNFUSED = UnfusedQKVAttention(cpu_rope.apply_rope, write_kv_cache, paged_attention_meta)
