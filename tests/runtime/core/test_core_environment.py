"""The served engine core's process environment (runtime/config.py core_process_environment)."""
from __future__ import annotations

from pathlib import Path

import pytest

from runtime.config import EngineConfig, core_process_environment
from runtime.core.process_engine import ProcessEngine


def test_openmp_threads_sleep_unless_the_user_chose_a_wait_policy(monkeypatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("TRTSERVE_PROBE", "kept")
    env = core_process_environment()
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["TRTSERVE_PROBE"] == "kept"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert core_process_environment()["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    assert "OMP_WAIT_POLICY" not in core_process_environment()


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads the core's /proc/PID/environ")
def test_the_started_core_process_runs_with_that_environment(build_tiny, monkeypatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    engine = ProcessEngine(build_tiny("tiny-qwen2"), EngineConfig(device="cpu"))
    try:
        environ = Path(f"/proc/{engine.process.pid}/environ").read_bytes().split(b"\0")
    finally:
        engine.shutdown()
    assert b"OMP_WAIT_POLICY=PASSIVE" in environ
