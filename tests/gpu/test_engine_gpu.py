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
from runtime.executor.model import DecoderModel
from tests.conftest import load_hf
from tests.helpers.engine_helpers import greedy, run_arrivals
from tests.helpers.teacher_forced import engine_logits, hf_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def qwen05_bf16(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("gpu-engines") / "qwen2.5-0.5b-bf16"
    limits = {"max_input_len": 2048, "max_seq_len": 4096, "max_num_tokens": 4096}
    build_engine(BuildRequest(model="qwen2.5-0.5b", output=out, dtype="bf16", random_weights=True, validate=False,
                              cache_dir=cache_dir, overrides=limits), Progress(6, enabled=False))
    return out


def _prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def _core(engine_dir: Path, graphs: bool) -> EngineCore:
    core = EngineCore.from_dir(engine_dir, EngineConfig(device="cuda", enable_cuda_graphs=graphs,
                                                        kv_cache_max_bytes=2 * 2**30))
    assert (len(core.executor.layout.cuda_graph_batch_sizes) > 0) == graphs
    return core


@pytest.mark.parametrize("preset", ["tiny-qwen2", "qwen2.5-0.5b"])
def test_cuda_graphs_give_the_eager_tokens(preset: str, build_tiny: Callable[..., Path], qwen05_bf16: Path) -> None:
    """n requests arriving together decode in lockstep at batch size n: on the ladder (1, 4, 16) the graph
    replays the eager step's kernels exactly; 3 pads to 4 (different GEMM shapes), checked in fp32 only."""
    engine_dir = build_tiny("tiny-qwen2") if preset == "tiny-qwen2" else qwen05_bf16
    vocab = load_engine(engine_dir).llm_config.vocab_size
    eager_core, graph_core = _core(engine_dir, False), _core(engine_dir, True)
    for n in (1, 3, 4, 16) if preset == "tiny-qwen2" else (1, 4, 16):
        prompts = _prompts(vocab, [5 + 7 * i for i in range(n)], seed=n)
        eager, graphs = ([(0, EngineRequest(f"n{n}-r{i}", p, greedy(24))) for i, p in enumerate(prompts)]
                         for _ in range(2))
        assert run_arrivals(graph_core, graphs) == run_arrivals(eager_core, eager), \
            f"{n} requests: CUDA-graph decode differs from eager decode"


def test_real_shape_bf16_matches_hf_on_gpu(qwen05_bf16: Path) -> None:
    engine = load_engine(qwen05_bf16)
    vocab = engine.llm_config.vocab_size
    prompts = _prompts(vocab, [300, 41, 129, 7], seed=9)
    continuations = _prompts(vocab, [24] * 4, seed=10)
    ours = engine_logits(DecoderModel(engine.llm_config, engine.weights, CUDA), prompts, continuations,
                         engine.build.tokens_per_block, capture=True)
    reference = hf_logits(load_hf(qwen05_bf16, torch.bfloat16).to(CUDA), prompts, continuations, CUDA)
    for i, (got, ref) in enumerate(zip(ours, reference)):
        cosine = torch.nn.functional.cosine_similarity(got, ref, dim=-1).min().item()
        agreement = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        assert cosine >= 0.99 and agreement >= 0.9, (i, cosine, agreement)


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
