"""The decoder on the Triton op set (Triton's interpreter on CPU) against the reference op set, and the
CUDA-graph runner's padded static-buffer path run eagerly (capture=False) against plain decode steps.

Tolerance: float32 logits within 1e-4 (the kernels sum in a different order). The real graph capture
is compared with eager steps on a GPU (tests/gpu/test_cuda_graphs_gpu.py).
"""
from __future__ import annotations

import pytest
import torch

from engine_format.engine_dir import LoadedEngine, load_engine
from plugins.registry import REFERENCE_OPS, triton_ops
from runtime.executor.cuda_graphs import CudaGraphRunner, batch_size_ladder
from runtime.executor.forward_batch import ForwardBatch, SequenceChunk
from runtime.executor.kv_storage import KVStorage
from runtime.executor.model import DecoderModel
from tests.conftest import load_hf
from tests.helpers.teacher_forced import engine_logits, hf_logits

CPU = torch.device("cpu")
ATOL = 1e-4
BLOCK = 16


@pytest.fixture(scope="module")
def engine(build_tiny) -> LoadedEngine:
    return load_engine(build_tiny("tiny-qwen2"))


def _prompts(engine: LoadedEngine, lengths: list[int]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, engine.llm_config.vocab_size, (n,), generator=gen).tolist() for n in lengths]


def _tables(lengths: list[int], total: int) -> list[list[int]]:
    """Disjoint, shuffled block lists with room for `total` tokens per sequence."""
    per_seq = -(-total // BLOCK)
    order = torch.randperm(per_seq * len(lengths) + 3, generator=torch.Generator().manual_seed(2)).tolist()
    return [order[i * per_seq:(i + 1) * per_seq] for i in range(len(lengths))]


def test_triton_ops_match_reference_prefill_chunked_and_decode(engine: LoadedEngine) -> None:
    lengths = [9, 23, 4]
    prompts, tables = _prompts(engine, lengths), _tables(lengths, 40)
    models = [DecoderModel(engine.llm_config, engine.weights, CPU, ops) for ops in (REFERENCE_OPS, triton_ops())]
    caches = [KVStorage(engine.llm_config, 3 * 3 + 3, BLOCK, torch.float32, CPU) for _ in models]
    steps = [   # whole prompts, then chunked prefill of the second mixed with decode rows, then decode
        [SequenceChunk(prompts[0], 0, tables[0]), SequenceChunk(prompts[1][:10], 0, tables[1], False),
         SequenceChunk(prompts[2], 0, tables[2])],
        [SequenceChunk([7], 9, tables[0]), SequenceChunk(prompts[1][10:], 10, tables[1]),
         SequenceChunk([11], 4, tables[2])],
        [SequenceChunk([3], 10, tables[0]), SequenceChunk([5], 23, tables[1]), SequenceChunk([2], 5, tables[2])],
    ]
    for chunks in steps:
        reference, triton = (m.forward(ForwardBatch.build(chunks, BLOCK, CPU), kv) for m, kv in zip(models, caches))
        torch.testing.assert_close(triton, reference, atol=ATOL, rtol=0)


def test_ladder() -> None:
    assert batch_size_ladder(1) == (1,)
    assert batch_size_ladder(20) == (1, 2, 4, 8, 16, 20)
    assert batch_size_ladder(64) == (1, 2, 4, 8, 16, 32, 48, 64)
    with pytest.raises(ValueError, match="max_size"):
        batch_size_ladder(0)


def test_padded_static_buffers_equal_plain_decode(engine: LoadedEngine) -> None:
    """Decode batches of 1, 3 and 5 sequences padded to 1, 4 and 8 rows: same logits as the unpadded step,
    and the padding rows write nothing into the cache."""
    lengths = [12, 30, 5, 17, 8]
    prompts, tables = _prompts(engine, lengths), _tables(lengths, 40)
    model = DecoderModel(engine.llm_config, engine.weights, CPU, triton_ops())
    kv = KVStorage(engine.llm_config, 5 * 3 + 3, BLOCK, torch.float32, CPU)
    model.forward(ForwardBatch.build([SequenceChunk(p, 0, t) for p, t in zip(prompts, tables)], BLOCK, CPU), kv)
    runner = CudaGraphRunner(model, kv, max_batch_size=8, max_blocks_per_seq=4, capture=False)
    assert runner.batch_sizes == (1, 2, 4, 8)
    for n, padded in ((1, 1), (3, 4), (5, 8)):
        chunks = [SequenceChunk([n + i], lengths[i], tables[i]) for i in range(n)]
        batch = ForwardBatch.build(chunks, BLOCK, CPU)
        assert runner.can_run(batch) and runner.padded_size(n) == padded
        before = [c.clone() for c in kv.key_caches]
        plain = model.forward(batch, kv)
        written = [c.clone() for c in kv.key_caches]
        for layer, cache in enumerate(kv.key_caches):       # undo the plain step's writes, then the runner's
            cache.copy_(before[layer])
        torch.testing.assert_close(runner.run(batch), plain, atol=1e-5, rtol=0)
        slots = batch.slot_mapping
        for cache, old, new in zip(kv.key_caches, before, written):
            flat, old_flat = cache.flatten(0, 1), old.flatten(0, 1)
            others = torch.ones(flat.shape[0], dtype=torch.bool)
            others[slots] = False
            assert torch.equal(flat[others], old_flat[others]), "a padding row wrote a slot"
            torch.testing.assert_close(flat[slots], new.flatten(0, 1)[slots], atol=1e-5, rtol=0)


def test_runner_declines_what_it_cannot_replay(engine: LoadedEngine) -> None:
    model = DecoderModel(engine.llm_config, engine.weights, CPU, triton_ops())
    kv = KVStorage(engine.llm_config, 8, BLOCK, torch.float32, CPU)
    runner = CudaGraphRunner(model, kv, max_batch_size=2, max_blocks_per_seq=2, capture=False)
    prefill = ForwardBatch.build([SequenceChunk([1, 2, 3], 0, [0])], BLOCK, CPU)
    too_many = ForwardBatch.build([SequenceChunk([1], 3, [i]) for i in range(3)], BLOCK, CPU)
    too_wide = ForwardBatch.build([SequenceChunk([1], 40, [0, 1, 2])], BLOCK, CPU)
    assert not any(runner.can_run(b) for b in (prefill, too_many, too_wide))
    with pytest.raises(ValueError, match="graph-safe"):
        CudaGraphRunner(DecoderModel(engine.llm_config, engine.weights, CPU, REFERENCE_OPS), kv, 2, 2, capture=False)


def test_teacher_forced_triton_path_matches_hf(engine: LoadedEngine) -> None:
    """The GPU parity test's procedure (tests/gpu/test_engine_gpu.py) on CPU: prefill, chunked prefill and
    padded-runner decode on the Triton ops against HF float32, within 1e-4."""
    prompts, continuations = _prompts(engine, [40, 9, 23]), _prompts(engine, [61, 62, 63])
    continuations = [c[-6:] for c in continuations]       # 3 sequences: the decode steps pad to 4 rows
    ours = engine_logits(DecoderModel(engine.llm_config, engine.weights, CPU, triton_ops()), prompts,
                         continuations, BLOCK, capture=False)
    reference = hf_logits(load_hf(engine.root), prompts, continuations, CPU)
    for got, ref in zip(ours, reference):
        assert got.shape == ref.shape == (6, engine.llm_config.vocab_size)
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
