"""trtserve-serve's GPU-path flags and --overlap reach EngineConfig (the cap itself is tested in
tests/runtime/executor/test_kv_sizing.py)."""
from __future__ import annotations

from grpc_service.server_cli import configs_from_args, parse_args


def test_flags_fill_the_engine_config() -> None:
    _, engine = configs_from_args(parse_args(["--engine", "e", "--kv-cache-max-bytes", "1048576",
                                              "--gpu-memory-fraction", "0.5", "--no-cuda-graphs",
                                              "--op-backend", "reference"]))
    assert (engine.kv_cache_max_bytes, engine.gpu_memory_fraction) == (1048576, 0.5)
    assert engine.enable_cuda_graphs is False and engine.op_backend == "reference"
    _, default = configs_from_args(parse_args(["--engine", "e"]))
    assert default.kv_cache_max_bytes is None and default.enable_cuda_graphs and default.op_backend == "auto"


def test_overlap_flag_reaches_the_core_process_config() -> None:
    """--overlap fills EngineConfig.overlap, which the core process gets in its JSON config (ProcessEngine)."""
    import msgspec

    from runtime.config import EngineConfig

    _, engine = configs_from_args(parse_args(["--engine", "e", "--overlap", "on"]))
    assert engine.overlap == "on"
    assert msgspec.json.decode(msgspec.json.encode(engine), type=EngineConfig).overlap == "on"
    assert configs_from_args(parse_args(["--engine", "e"]))[1].overlap == "auto"


def test_cpu_threads_flag_reaches_the_core_process_config() -> None:
    """--cpu-threads fills EngineConfig.cpu_threads, which the core process gets in its JSON config (run_core
    sets torch's threads from it); a negative value is refused naming the field."""
    import msgspec
    import pytest

    from grpc_service.server_cli import configs_from_args, parse_args
    from runtime.config import EngineConfig, EngineConfigError

    _, engine = configs_from_args(parse_args(["--engine", "e", "--cpu-threads", "1"]))
    assert engine.cpu_threads == 1
    assert msgspec.json.decode(msgspec.json.encode(engine), type=EngineConfig).cpu_threads == 1
    assert configs_from_args(parse_args(["--engine", "e"]))[1].cpu_threads == 0
    with pytest.raises(EngineConfigError) as info:
        EngineConfig(cpu_threads=-1).validate()
    assert info.value.field == "cpu_threads" and "-1" in str(info.value)
