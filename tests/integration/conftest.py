"""Fixtures for the gRPC integration tests: one server subprocess per test module, and the in-process
reference engine it is compared against (helpers in grpc_fixtures.py)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.grpc_fixtures import Reference, ServerProcess


@pytest.fixture(scope="module")
def tiny_engine_dir(build_tiny: Callable[..., Path]) -> Path:
    return build_tiny("tiny-qwen2")


@pytest.fixture(scope="module")
def grpc_server(tiny_engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The default server: the tiny engine, both APIs, default limits (queue 64, decoupled ensemble)."""
    server = ServerProcess.start(["--engine", str(tiny_engine_dir)], tmp_path_factory.mktemp("grpc-logs"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(tiny_engine_dir: Path) -> Reference:
    return Reference(tiny_engine_dir)
