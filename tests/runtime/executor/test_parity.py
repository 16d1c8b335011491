"""The PyTorch executor against HF transformers (float32, tolerance 1e-4 on logits)."""
from __future__ import annotations

import pytest
import torch

from engine_format.engine_dir import load_engine
from runtime.executor.forward_batch import ForwardBatch, SequenceChunk
from runtime.executor.kv_storage import KVStorage
from runtime.executor.model import DecoderModel
from runtime.executor.sequential import SequentialRunner
from tests.conftest import load_hf

ATOL = 1e-4
PRESETS = ["tiny-qwen2", "tiny-llama"]


def _setup(build_tiny, preset: str, **overrides: int):
    engine = load_engine(build_tiny(preset, **overrides))
    return engine, DecoderModel(engine.llm_config, engine.weights, torch.device("cpu")), load_hf(engine.root)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("block_size", [16, 5])
def test_packed_prefill_matches_hf(build_tiny, preset: str, block_size: int) -> None:
    engine, model, hf = _setup(build_tiny, preset)
    gen = torch.Generator().manual_seed(1)
    lengths = [1, 7, 33, 130, 300]   # 300 > 256 exercises llama3's low-frequency band on tiny-llama
    seqs = [torch.randint(0, engine.llm_config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    blocks, chunks, next_block = [], [], 40   # start at a non-zero block: tables must be honoured
    for ids in seqs:
        n = -(-len(ids) // block_size)
        ids_blocks = list(range(next_block + n - 1, next_block - 1, -1))   # reversed: non-contiguous order
        next_block += n
        chunks.append(SequenceChunk(ids, 0, ids_blocks))
        blocks.append(ids_blocks)
    kv = KVStorage(engine.llm_config, next_block, block_size, torch.float32, torch.device("cpu"))
    packed = model.forward(ForwardBatch.build(chunks, block_size, torch.device("cpu")), kv)
    with torch.inference_mode():
        for i, ids in enumerate(seqs):
            ref = hf(torch.tensor([ids])).logits[0, -1]
            torch.testing.assert_close(packed[i], ref, atol=ATOL, rtol=0)
            alone = SequentialRunner(model, len(ids), block_size).feed(ids)
            torch.testing.assert_close(alone, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_mixed_prefill_and_decode_batch_matches_hf(build_tiny, preset: str) -> None:
    """One step holding a decode token, a chunked-prefill continuation and a fresh prefill."""
    engine, model, hf = _setup(build_tiny, preset)
    bs = 8
    kv = KVStorage(engine.llm_config, 64, bs, torch.float32, torch.device("cpu"))
    a, b, c = list(range(10, 30)), list(range(100, 141)), list(range(500, 512))
    tables = [list(range(4)), list(range(4, 10)), list(range(10, 12))]
    first = ForwardBatch.build([SequenceChunk(a, 0, tables[0]), SequenceChunk(b[:17], 0, tables[1])],
                               bs, torch.device("cpu"))
    model.forward(first, kv)
    step = ForwardBatch.build([SequenceChunk([7], 20, tables[0]),
                               SequenceChunk(b[17:], 17, tables[1]), SequenceChunk(c, 0, tables[2])],
                              bs, torch.device("cpu"))
    logits = model.forward(step, kv)
    with torch.inference_mode():
        for row, ids in enumerate([a + [7], b, c]):
            torch.testing.assert_close(logits[row], hf(torch.tensor([ids])).logits[0, -1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_64_greedy_tokens_identical_to_hf_generate(build_tiny, preset: str) -> None:
    engine, model, hf = _setup(build_tiny, preset)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(engine.tokenizer_dir))
    prompts = ["The capital of France is", "def add(a, b):", "你好，世界", "Numbers: 1 2 3"]
    runner = SequentialRunner(model, 256, engine.build.tokens_per_block)
    for text in prompts:
        ids = tokenizer(text)["input_ids"]
        prompt = torch.tensor([ids])
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=64, do_sample=False,
                          pad_token_id=engine.pad_token_id)[0, len(ids):].tolist()
        assert len(ref) == 64
        assert runner.greedy(ids, 64) == ref, text


def test_engine_core_holds_one_copy_of_each_weight(build_tiny) -> None:
    """Where a linear re-lays its weight out (a contiguous [K, N] copy, the fused gate/up), the model drops the
    checkpoint's [N, K] tensor, and the engine core keeps the engine's description without its tensors: no
    weight is held twice."""
    from runtime.config import EngineConfig
    from runtime.core.engine_core import EngineCore

    engine_dir = build_tiny("tiny-qwen2")
    core = EngineCore.from_dir(engine_dir, EngineConfig(device="cpu"))
    model = core.executor.model
    assert core.engine.weights == {}
    assert not [name for name in model.w if name.endswith(".weight") and name.split(".")[-2] in
                ("qkv", "dense", "fc", "gate", "proj", "lm_head")]
    linears = [*model.linears.values(), *model.gate_up, model.lm_head]
    assert all(linear.weight_t.is_contiguous() for linear in linears)    # tiny-qwen2: every weight is copied
    storages = [linear.weight_t.untyped_storage().data_ptr() for linear in linears]
    storages += [t.untyped_storage().data_ptr() for t in model.w.values()]
    assert len(storages) == len(set(storages))
