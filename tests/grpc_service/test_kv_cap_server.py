"""trtserve-serve --kv-cache-max-bytes on CPU: the pool stays under the cap, the start-up log reports it,
and the metrics endpoint shows the pool's bytes and blocks."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine_format.engine_dir import load_engine
from grpc_service.launcher import ServerProcess, metric_value
from runtime.executor.kv_storage import bytes_per_block

CAP = 300_000


def test_capped_pool_in_log_and_metrics(build_tiny: Callable[..., Path],
                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    engine_dir = build_tiny("tiny-qwen2")
    engine = load_engine(engine_dir)
    per_block = bytes_per_block(engine.llm_config, engine.build.tokens_per_block, getattr(torch, engine.llm_config.dtype))
    server = ServerProcess.start(["--engine", str(engine_dir), "--kv-cache-max-bytes", str(CAP), "--no-warmup",
                                  "--no-http"], tmp_path_factory.mktemp("kv-cap-logs"))
    try:
        text = server.metrics()
        name = engine.name
        assert metric_value(text, "trtserve_kv_cache_bytes", model=name) == (CAP // per_block) * per_block
        assert metric_value(text, "trtserve_kv_blocks_total", model=name) == CAP // per_block
        assert f"sized by kv_cache_max_bytes={CAP}" in server.log()
    finally:
        server.stop()
