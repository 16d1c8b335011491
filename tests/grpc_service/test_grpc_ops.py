"""Operations against real server subprocesses: Prometheus metrics, cancel and disconnect mid-stream (the KV
pool returns to its baseline), a flood beyond the bounded queue, and SIGTERM with requests in flight."""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpc_service.client import NativeClient, Sampling
from grpc_service.proto import trtserve_pb2 as pb
from grpc_service.proto import trtserve_pb2_grpc
from tests.helpers.grpc_fixtures import (
    Reference,
    ServerProcess,
    metric_value,
    wait_idle,
)

LONG = pb.SamplingParameters(max_tokens=1500, ignore_eos=True, temperature=0.0)


def assert_back_to_baseline(client: NativeClient, baseline: pb.EngineStatus, within_s: float) -> None:
    """Idle again within `within_s` (wait_idle returns the non-idle status at its deadline, failing below)."""
    status = wait_idle(client, within_s)
    assert status.num_in_flight == 0 and status.num_running == 0 and status.num_waiting == 0, status
    assert status.kv_used_blocks == baseline.kv_used_blocks == 0, status
    assert status.kv_free_blocks == baseline.kv_free_blocks, status


def test_metrics_endpoint(grpc_server: ServerProcess) -> None:
    with NativeClient(grpc_server.target, timeout_s=60) as client:
        client.generate("metrics please", Sampling(max_tokens=6, ignore_eos=True))
        with pytest.raises(grpc.RpcError):
            client.generate("", Sampling(max_tokens=6))
    text = grpc_server.metrics()
    name = grpc_server_model(grpc_server)
    assert metric_value(text, "trtserve_requests_total", model=name, api="native", outcome="length") >= 1
    assert metric_value(text, "trtserve_requests_total", model=name, api="native",
                        outcome="invalid_argument") >= 1
    for histogram in ("trtserve_time_to_first_token_seconds", "trtserve_time_per_output_token_seconds",
                      "trtserve_request_latency_seconds"):
        assert metric_value(text, histogram + "_count", model=name, api="native") >= 1
    assert metric_value(text, "trtserve_generated_tokens_total", model=name) >= 6
    assert metric_value(text, "trtserve_kv_blocks_total", model=name) > 0
    assert metric_value(text, "trtserve_kv_blocks", model=name, state="free") == metric_value(
        text, "trtserve_kv_blocks_total", model=name)
    assert metric_value(text, "trtserve_rpc_errors_total", method="trtserve.v1.LLMService.Generate",
                        code="invalid_argument") >= 1
    for gauge in ("trtserve_queue_depth", "trtserve_requests_running", "trtserve_prefix_cache_hit_rate"):
        assert f"{gauge}{{" in text


def grpc_server_model(server: ServerProcess) -> str:
    with NativeClient(server.target) as client:
        return client.models()[0].name


def test_cancel_and_disconnect_free_the_kv_blocks(grpc_server: ServerProcess) -> None:
    with NativeClient(grpc_server.target, timeout_s=60) as client:
        baseline = wait_idle(client)
        # 1. native client cancels mid-stream
        call = client.stub.Generate(pb.GenerateRequest(text="cancel me " * 10, sampling=LONG))
        for _ in range(3):
            next(call)
        assert client.model_info().status.kv_used_blocks > 0
        call.cancel()
        assert_back_to_baseline(client, baseline, within_s=2.0)
        # 2. a client process vanishes mid-stream (TCP connection dropped)
        script = ("import sys; from grpc_service.client import NativeClient, Sampling\n"
                  "c = NativeClient(sys.argv[1])\n"
                  "for i, r in enumerate(c.stream('disconnect me', Sampling(max_tokens=1500, ignore_eos=True))):\n"
                  "    print('started', flush=True) if i == 2 else None\n")
        proc = subprocess.Popen([sys.executable, "-c", script, grpc_server.target], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "started"
        proc.kill()
        proc.wait()
        assert_back_to_baseline(client, baseline, within_s=3.0)
        # 3. a Triton client closes its stream with requests in flight
        triton = tc.InferenceServerClient(grpc_server.target)
        got_one = threading.Event()
        triton.start_stream(callback=lambda result, error: got_one.set())
        inputs = [tc.InferInput("text_input", [1, 1], "BYTES"), tc.InferInput("max_tokens", [1, 1], "INT32"),
                  tc.InferInput("min_tokens", [1, 1], "INT32"), tc.InferInput("stream", [1, 1], "BOOL")]
        for t, value in zip(inputs, (np.array([[b"triton cancel"]], dtype=object), np.array([[1500]], np.int32),
                                     np.array([[1500]], np.int32), np.array([[True]]))):
            t.set_data_from_numpy(value)
        triton.async_stream_infer("ensemble", inputs, request_id="abandoned")
        assert got_one.wait(30)
        triton.stop_stream(cancel_requests=True)
        triton.close()
        assert_back_to_baseline(client, baseline, within_s=3.0)
    assert metric_value(grpc_server.metrics(), "trtserve_requests_total", model=grpc_server_model(grpc_server),
                        api="native", outcome="cancelled") >= 2


@pytest.fixture(scope="module")
def small_queue_server(tiny_engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """max_batch_size 2 (engine option) + max_queue_size 2: at most 4 requests in flight."""
    server = ServerProcess.start(["--engine", str(tiny_engine_dir), "--max-queue-size", "2"],
                                 tmp_path_factory.mktemp("grpc-flood"), env={"TRTSERVE_MAX_BATCH_SIZE": "2"})
    yield server
    server.stop()


def test_flood_beyond_the_queue(small_queue_server: ServerProcess) -> None:
    async def one(stub: trtserve_pb2_grpc.LLMServiceStub, i: int) -> tuple[str, float, int]:
        start = time.monotonic()
        request = pb.GenerateRequest(text=f"flood {i}", sampling=pb.SamplingParameters(
            max_tokens=600, ignore_eos=True, temperature=0.0))
        num_tokens = 0
        try:
            async for response in stub.Generate(request, timeout=120):
                num_tokens += len(response.token_ids)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, time.monotonic() - start, num_tokens
        return "OK", time.monotonic() - start, num_tokens

    async def flood() -> list[tuple[str, float, int]]:
        async with grpc.aio.insecure_channel(small_queue_server.target) as channel:
            stub = trtserve_pb2_grpc.LLMServiceStub(channel)
            return await asyncio.gather(*(one(stub, i) for i in range(12)))

    results = asyncio.run(flood())
    admitted = [r for r in results if r[0] == "OK"]
    refused = [r for r in results if r[0] != "OK"]
    assert len(admitted) == 4 and all(n == 600 for _, _, n in admitted), results
    assert {code for code, _, _ in refused} == {"RESOURCE_EXHAUSTED"}, results
    assert max(t for _, t, _ in refused) < min(t for _, t, _ in admitted), results   # refused at once
    with NativeClient(small_queue_server.target, timeout_s=60) as client:
        assert client.generate("after the flood", Sampling(max_tokens=5, ignore_eos=True)).completion_tokens == 5
        info = client.model_info()
        assert info.status.max_in_flight == 4 and info.status.num_in_flight == 0
    assert metric_value(small_queue_server.metrics(), "trtserve_requests_total", model=info.model.name,
                        api="native", outcome="resource_exhausted") == 8


def test_sigterm_drains_in_flight_requests(tiny_engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    server = ServerProcess.start(["--engine", str(tiny_engine_dir), "--grace-period", "60"],
                                 tmp_path_factory.mktemp("grpc-sigterm"))
    try:
        results: list[tuple[int, str]] = []
        started = threading.Barrier(4)

        def run(i: int) -> None:
            with NativeClient(server.target, timeout_s=120) as client:
                num_tokens, finish = 0, ""
                for j, response in enumerate(client.stream(f"drain {i}", Sampling(max_tokens=1500, ignore_eos=True))):
                    if j == 1:
                        started.wait(30)
                    num_tokens += len(response.token_ids)
                    finish = response.finish_reason or finish
                results.append((num_tokens, finish))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        triton = tc.InferenceServerClient(server.target)      # a stream opened before the signal
        stream_errors: list[str] = []
        triton.start_stream(callback=lambda result, error: stream_errors.append(str(error)))
        started.wait(30)
        server.process.send_signal(signal.SIGTERM)
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 5
            while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(grpc.RpcError) as info:
                list(trtserve_pb2_grpc.LLMServiceStub(channel).Generate(
                    pb.GenerateRequest(text="too late"), timeout=10))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in info.value.details()
            late = [tc.InferInput("text_input", [1, 1], "BYTES"), tc.InferInput("max_tokens", [1, 1], "INT32")]
            late[0].set_data_from_numpy(np.array([[b"late"]], dtype=object))
            late[1].set_data_from_numpy(np.array([[4]], dtype=np.int32))
            triton.async_stream_infer("ensemble", late, request_id="late")
            deadline = time.monotonic() + 10
            while not stream_errors and time.monotonic() < deadline:
                time.sleep(0.01)
            assert stream_errors and "shutting down" in stream_errors[0]
        for t in threads:
            t.join(120)
        assert results == [(1500, "length")] * 3
        triton.stop_stream(cancel_requests=True)
        assert server.process.wait(timeout=60) == 0
    finally:
        server.stop()


def test_kv_exhaustion_preempts_and_rejects_what_cannot_fit(tiny_engine_dir: Path, reference: Reference,
                                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    """8 KV blocks of 16 tokens: two 80-token requests cannot both hold their blocks (one is preempted and
    recomputed, with the same greedy text); a request larger than the whole cache is refused at admission."""
    server = ServerProcess.start(["--engine", str(tiny_engine_dir), "--num-kv-blocks", "8"],
                                 tmp_path_factory.mktemp("grpc-kv"))
    try:
        prompts = [reference.encode(f"preemption prompt number {i} " * 3)[:20] for i in range(2)]
        expected = [reference.greedy(ids, 60, ignore_eos=True)[1] for ids in prompts]

        def run(ids: list[int], out: list[list[int]]) -> None:
            with NativeClient(server.target, timeout_s=120) as client:
                out.append(client.generate(ids, Sampling(max_tokens=60, ignore_eos=True)).token_ids)

        outputs: list[list[list[int]]] = [[], []]
        threads = [threading.Thread(target=run, args=(ids, out)) for ids, out in zip(prompts, outputs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [o[0] for o in outputs] == expected
        with NativeClient(server.target, timeout_s=60) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.generate(prompts[0], Sampling(max_tokens=200))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_tokens" in info.value.details() and "KV cache" in info.value.details()
            status = wait_idle(client)
            assert status.num_preemptions >= 1 and status.kv_used_blocks == 0
    finally:
        server.stop()
