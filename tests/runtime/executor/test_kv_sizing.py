"""KV pool sizing: the hard byte cap (on CPU, through the real executor), the profiled-peak GPU budget
arithmetic, and the errors that name the field whose limit leaves no room."""
from __future__ import annotations

import pytest
import torch

from engine_format.engine_dir import load_engine
from runtime.config import EngineConfig, EngineConfigError
from runtime.executor.executor import PyTorchExecutor
from runtime.executor.kv_sizing import CUDA_GRAPH_RESERVE_BYTES, GIB, GpuMemory, gpu_kv_budget, size_kv_pool
from runtime.executor.kv_storage import bytes_per_block
from runtime.executor.memory_profile import warm_up_forward
from runtime.executor.model import DecoderModel
from runtime.generate_cli import main
from runtime.vision.vision_encoder import load_vision_encoder

PER_BLOCK = 4096


def test_cpu_budget_then_cap_then_wanted() -> None:
    pool = size_kv_pool(EngineConfig(kv_cache_memory_gib=1.0), 10**9, PER_BLOCK, None)
    assert pool.num_blocks == GIB // PER_BLOCK and "kv_cache_memory_gib" in pool.description
    capped = size_kv_pool(EngineConfig(kv_cache_max_bytes=10 * PER_BLOCK + 5), 10**9, PER_BLOCK, None)
    assert capped.num_blocks == 10 and "kv_cache_max_bytes" in capped.description
    few = size_kv_pool(EngineConfig(kv_cache_max_bytes=10 * PER_BLOCK), 4, PER_BLOCK, None)
    assert few.num_blocks == 4


def test_cap_errors_name_the_field() -> None:
    with pytest.raises(EngineConfigError, match="kv_cache_max_bytes.*one block is 4096 bytes"):
        size_kv_pool(EngineConfig(kv_cache_max_bytes=PER_BLOCK - 1), 100, PER_BLOCK, None)
    with pytest.raises(EngineConfigError, match="num_kv_blocks.*exceed kv_cache_max_bytes"):
        size_kv_pool(EngineConfig(num_kv_blocks=3, kv_cache_max_bytes=2 * PER_BLOCK), 100, PER_BLOCK, None)
    with pytest.raises(EngineConfigError, match="kv_cache_max_bytes"):
        EngineConfig(kv_cache_max_bytes=0).validate()


def test_gpu_budget_from_profiled_peak() -> None:
    gpu = GpuMemory(total_bytes=80 * GIB, free_bytes=70 * GIB, reserved_bytes=9 * GIB, peak_bytes=6 * GIB)
    # 0.9 * 80 - 6 (peak) - 1 (outside PyTorch: 80 - 70 - 9) - graph reserve
    assert gpu_kv_budget(gpu, 0.9, cuda_graphs=True) == int(72 * GIB) - 7 * GIB - CUDA_GRAPH_RESERVE_BYTES
    assert gpu_kv_budget(gpu, 0.9, cuda_graphs=False) == int(72 * GIB) - 7 * GIB
    pool = size_kv_pool(EngineConfig(gpu_memory_fraction=0.9), 10**9, 2**20, gpu)
    assert pool.num_blocks == gpu_kv_budget(gpu, 0.9, True) // 2**20 and "profiled peak" in pool.description
    capped = size_kv_pool(EngineConfig(kv_cache_max_bytes=3 * GIB), 10**9, 2**20, gpu)
    assert capped.num_blocks == 3 * 1024
    with pytest.raises(EngineConfigError, match="gpu_memory_fraction"):
        size_kv_pool(EngineConfig(gpu_memory_fraction=0.05), 10**9, 2**20, gpu)


def test_executor_pool_respects_the_cap_on_cpu(build_tiny) -> None:
    engine = load_engine(build_tiny("tiny-qwen2"))
    executor = PyTorchExecutor(engine, EngineConfig(device="cpu", kv_cache_max_bytes=300_000))
    layout = executor.layout
    allocated = sum(t.numel() * t.element_size() for t in executor.kv.key_caches + executor.kv.value_caches)
    assert layout.num_kv_blocks == 300_000 // layout.kv_bytes_per_block
    assert allocated == layout.kv_cache_bytes <= 300_000
    assert "kv_cache_max_bytes=300000" in layout.kv_sizing
    assert layout.cuda_graph_batch_sizes == () and layout.profiled_peak_bytes is None


def test_cap_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRTSERVE_KV_CACHE_MAX_BYTES", "123456")
    monkeypatch.setenv("TRTSERVE_ENABLE_CUDA_GRAPHS", "0")
    config = EngineConfig.from_env()
    assert config.kv_cache_max_bytes == 123456 and config.enable_cuda_graphs is False


def test_generate_cli_caps_and_reports_the_pool(build_tiny, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--engine", str(build_tiny("tiny-qwen2")), "--prompt", "hello", "--max-tokens", "2",
                 "--device", "cpu", "--kv-cache-max-bytes", "300000", "--no-cuda-graphs"])
    err = capsys.readouterr().err
    assert code == 0
    assert "KV cache on cpu:" in err and "sized by kv_cache_max_bytes=300000" in err
    code = main(["--engine", str(build_tiny("tiny-qwen2")), "--prompt", "hello", "--kv-cache-max-bytes", "10"])
    assert code == 2 and "kv_cache_max_bytes" in capsys.readouterr().err


def test_warm_up_forward_reaches_the_limits(build_tiny) -> None:
    """The profiled step (run here on CPU, measured on CUDA): max_num_tokens tokens over max_batch_size
    sequences, and a vision-language engine's encoder at max_encoder_patches."""
    engine = load_engine(build_tiny("tiny-qwen2-vl"))
    cpu = torch.device("cpu")
    model = DecoderModel(engine.llm_config, engine.weights, cpu)
    config = EngineConfig(device="cpu", max_num_tokens=300, max_batch_size=4, max_encoder_patches=70)
    kv_bytes, logits_rows, vision_rows = warm_up_forward(model, load_vision_encoder(engine, "pytorch", cpu),
                                                         engine, config)
    block = engine.build.tokens_per_block
    assert logits_rows == 4
    assert kv_bytes == 4 * -(-75 // block) * bytes_per_block(engine.llm_config, block, model.dtype)
    merge = engine.vision.config.spatial_merge_size
    side = 8 // merge * merge                   # the largest square of whole merge windows in 70 patches
    assert vision_rows == side * side // merge**2
