"""The engine on a CUDA GPU: CUDA-graph decode against eager decode (greedy tokens), a real-shape bf16
engine against HF transformers on the GPU (teacher-forced logits through prefill, chunked prefill and
graph-replayed decode), and the KV pool's profiled sizing and cap. Skipped where no GPU is present.

Parity tolerance (bf16, random weights, Qwen2.5-0.5B shape, 24 layers): per position cosine
similarity of the logits >= 0.99 and the same top-1 token at >= 90 % of positions (bf16 rounding
differs between HF's eager kernels and ours; near-ties of a random model flip a few argmaxes).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from builder.pipeline import BuildRequest, build_engine
from builder.progress import Progress
from engine_format.engine_dir import LoadedEngine, load_engine
from runtime.config import EngineConfig
from runtime.core.engine_core import EngineCore, EngineRequest
from runtime.executor.cuda_graphs import CudaGraphRunner
from runtime.executor.forward_batch import ForwardBatch, SequenceChunk
from runtime.executor.kv_storage import KVStorage
from runtime.executor.model import DecoderModel
from tests.conftest import load_hf
from tests.helpers.engine_helpers import greedy, run_arrivals

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def qwen05_bf16(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("gpu-engines") / "qwen2.5-0.5b-bf16"
    build_engine(BuildRequest(model="qwen2.5-0.5b", output=out, dtype="bf16", random_weights=True, validate=False,
                              cache_dir=cache_dir, overrides={"max_seq_len": 4096, "max_num_tokens": 4096}),
                 Progress(6, enabled=False))
    return out


def _prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def _greedy_tokens(engine_dir: Path, graphs: bool, prompts: list[list[int]], max_tokens: int) -> dict[str, list[int]]:
    core = EngineCore.from_dir(engine_dir, EngineConfig(device="cuda", enable_cuda_graphs=graphs,
                                                        kv_cache_max_bytes=2 * 2**30))
    assert (len(core.executor.layout.cuda_graph_batch_sizes) > 0) == graphs
    arrivals = [(0, EngineRequest(f"r{i}", p, greedy(max_tokens))) for i, p in enumerate(prompts)]
    return run_arrivals(core, arrivals)


@pytest.mark.parametrize("preset", ["tiny-qwen2", "qwen2.5-0.5b"])
def test_cuda_graphs_give_the_eager_tokens(preset: str, build_tiny: Callable[..., Path], qwen05_bf16: Path) -> None:
    engine_dir = build_tiny("tiny-qwen2") if preset == "tiny-qwen2" else qwen05_bf16
    vocab = load_engine(engine_dir).llm_config.vocab_size
    counts = (1, 3, 4, 16) if preset == "tiny-qwen2" else (1, 4, 16)    # 3 pads to 4: fp32 only (see docstring)
    for n in counts:
        prompts = _prompts(vocab, [5 + 7 * i for i in range(n)], seed=n)
        eager = _greedy_tokens(engine_dir, False, prompts, 24)
        graphs = _greedy_tokens(engine_dir, True, prompts, 24)
        assert graphs == eager, f"{n} requests: CUDA-graph decode differs from eager decode"


def test_real_shape_bf16_matches_hf_on_gpu(qwen05_bf16: Path) -> None:
    engine = load_engine(qwen05_bf16)
    hf = load_hf(qwen05_bf16, torch.bfloat16).to(CUDA)
    model = DecoderModel(engine.llm_config, engine.weights, CUDA)
    block = engine.build.tokens_per_block
    prompts = _prompts(engine.llm_config.vocab_size, [300, 41, 129, 7], seed=9)
    decode_steps = 24
    full = [p + _prompts(engine.llm_config.vocab_size, [decode_steps], seed=10 + i)[0] for i, p in enumerate(prompts)]
    tables = [list(range(i * 16, (i + 1) * 16)) for i in range(len(full))]     # 16 blocks of 32 tokens each
    kv = KVStorage(engine.llm_config, 16 * len(full), block, model.dtype, CUDA)
    runner = CudaGraphRunner(model, kv, max_batch_size=4, max_blocks_per_seq=16)
    ours: list[list[torch.Tensor]] = [[] for _ in full]
    # prefill: the first two prompts whole, the others in two chunks (chunked prefill over the paged cache)
    first = [SequenceChunk(p if i < 2 else p[:len(p) // 2], 0, tables[i], i < 2) for i, p in enumerate(prompts)]
    logits = model.forward(ForwardBatch.build(first, block, CUDA), kv)
    for row, i in enumerate((0, 1)):
        ours[i].append(logits[row])
    rest = [SequenceChunk(p[len(p) // 2:], len(p) // 2, tables[i]) for i, p in enumerate(prompts) if i >= 2]
    logits = model.forward(ForwardBatch.build(rest, block, CUDA), kv)
    for row, i in enumerate((2, 3)):
        ours[i].append(logits[row])
    for step in range(decode_steps - 1):            # teacher-forced decode, replayed from the captured graph
        chunks = [SequenceChunk([seq[len(p) + step]], len(p) + step, tables[i])
                  for i, (p, seq) in enumerate(zip(prompts, full))]
        batch = ForwardBatch.build(chunks, block, CUDA, split_context=16 * block)
        assert runner.can_run(batch)
        logits = runner.run(batch)
        for i in range(len(full)):
            ours[i].append(logits[i])
    with torch.inference_mode():
        for i, (p, seq) in enumerate(zip(prompts, full)):
            ref = hf(torch.tensor([seq[:len(p) + decode_steps - 1]], device=CUDA)).logits[0, len(p) - 1:].float()
            got = torch.stack(ours[i]).float()
            cosine = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
            agreement = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
            assert cosine.min().item() >= 0.99 and agreement >= 0.9, (i, cosine.min().item(), agreement)


def test_pool_is_sized_from_the_profiled_peak_and_capped(qwen05_bf16: Path) -> None:
    engine: LoadedEngine = load_engine(qwen05_bf16)
    weight_bytes = sum(t.numel() * t.element_size() for t in engine.weights.values())
    core = EngineCore.from_dir(qwen05_bf16, EngineConfig(device="cuda", gpu_memory_fraction=0.3))
    layout = core.executor.layout
    assert layout.profiled_peak_bytes is not None and layout.profiled_peak_bytes > weight_bytes
    free, total = torch.cuda.mem_get_info()
    assert layout.kv_cache_bytes <= 0.3 * total and "profiled peak" in layout.kv_sizing
    del core
    capped = EngineCore.from_dir(qwen05_bf16, EngineConfig(device="cuda", kv_cache_max_bytes=64 * 2**20))
    assert capped.executor.layout.kv_cache_bytes <= 64 * 2**20
    assert capped.executor.layout.num_kv_blocks == 64 * 2**20 // capped.executor.layout.kv_bytes_per_block
