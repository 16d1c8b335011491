"""The server's engine core in its own process (the default): a crash of that process.

The server runs on uvloop's event loop, its threads under SCHED_BATCH and the core's main thread under the
normal policy. The core
is SIGKILLed while three native streams are in flight: each stream ends with UNAVAILABLE
("the engine is not running"; the server's log names the core's exit code), health turns NOT_SERVING,
a new request is refused at once, and the server still shuts down cleanly; every wait is bounded
(nothing hangs). Greedy equivalence of the split with
the in-process engine: tests/runtime/core/test_process_engine.py, and every gRPC test compares the
(split) server with the in-process Reference.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpc_service.client import NativeClient, Sampling
from tests.helpers.grpc_fixtures import ServerProcess

WAIT_S = 30.0


def core_pid(server_pid: int) -> int:
    """The server's child running runtime.core.core_process."""
    children = []
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        children += (task / "children").read_text().split()
    for pid in children:
        if b"runtime.core.core_process" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return int(pid)
    raise AssertionError(f"no engine core process among the server's children {children}")


def assert_front_end_batch_scheduled(server_pid: int, core: int) -> None:
    """The server's threads run under SCHED_BATCH (grpc_service/thread_sched.py); the engine core's, started
    before that, under the normal policy."""
    if not hasattr(os, "SCHED_BATCH"):
        return
    policies = {}
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        try:
            policies[task.name] = os.sched_getscheduler(int(task.name))
        except ProcessLookupError:      # a pool thread that ended meanwhile
            pass
    assert policies and set(policies.values()) == {os.SCHED_BATCH}, policies
    assert os.sched_getscheduler(core) == os.SCHED_OTHER


def test_core_crash_fails_streams_and_turns_health_off(tiny_engine_dir: Path,
                                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    server = ServerProcess.start(["--engine", str(tiny_engine_dir)], tmp_path_factory.mktemp("core-crash"))
    try:
        errors: list[grpc.RpcError] = []
        started = threading.Barrier(4)

        def run(i: int) -> None:
            with NativeClient(server.target, timeout_s=120) as client:
                try:
                    for j, _ in enumerate(client.stream(f"crash {i}", Sampling(max_tokens=1500, ignore_eos=True))):
                        if j == 1:
                            started.wait(WAIT_S)
                except grpc.RpcError as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        started.wait(WAIT_S)
        core = core_pid(server.process.pid)
        assert_front_end_batch_scheduled(server.process.pid, core)
        os.kill(core, signal.SIGKILL)
        for t in threads:
            t.join(WAIT_S)
        assert not any(t.is_alive() for t in threads), "a stream hangs after the core died"
        assert len(errors) == 3
        for exc in errors:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and "engine is not running" in exc.details()
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + WAIT_S
            while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "health still SERVING after the core died"
                time.sleep(0.05)
        with NativeClient(server.target, timeout_s=10) as client:
            with pytest.raises(grpc.RpcError) as info:
                list(client.stream("after the crash", Sampling(max_tokens=4)))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=WAIT_S)
        assert "engine core process exited (code -9)" in server.log()
        assert server.log_path is not None and "event loop: uvloop" in server.log_path.read_text(), \
            "the server runs on uvloop's loop (grpc_service/event_loop.py)"
    finally:
        server.stop()
