"""The KServe statistics extension as perf_analyzer reads it: per model and version, counters that move with
every request, an ensemble request counted on its composing models, compute counts that agree. First the
replay of perf_analyzer's own reads and checks (tests/helpers/perf_analyzer.py), then perf_analyzer 2.41
itself (fetched by `make test` through benchmarks/get_perf_analyzer.sh) at concurrency 1 and 4, streaming,
against `ensemble` and `tensorrt_llm`, its throughput checked against the server's own counters."""
from __future__ import annotations

import json
import queue
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc

from tests.helpers.grpc_fixtures import ServerProcess
from tests.helpers.perf_analyzer import (
    Counters,
    PerfAnalyzerError,
    parse_report,
    read_statistics,
    server_side_status,
    summarize,
)

REPO = Path(__file__).resolve().parents[2]
PERF_ANALYZER = REPO / ".cache" / "perf_analyzer" / "perf_analyzer"
ENSEMBLE, LLM = ("ensemble", ""), ("tensorrt_llm", "")
MAX_TOKENS = 6
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(grpc_server: ServerProcess) -> tc.InferenceServerClient:
    triton = tc.InferenceServerClient(grpc_server.target)
    yield triton
    triton.close()


def tensor(name: str, array: np.ndarray, datatype: str) -> tc.InferInput:
    t = tc.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def stream_requests(target: str, model: str, inputs: list[tc.InferInput], num_requests: int) -> list[int]:
    """Requests one after another on one stream; the number of responses each got (errors raise)."""
    results: queue.Queue = queue.Queue()
    counts = []
    with tc.InferenceServerClient(target) as client:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            for _ in range(num_requests):
                client.async_stream_infer(model, inputs)
                count = 0
                while True:
                    result, error = results.get(timeout=60)
                    if error is not None:
                        raise RuntimeError(str(error))
                    count += 1
                    if result.get_response().parameters["triton_final_response"].bool_param:
                        break
                counts.append(count)
        finally:
            client.stop_stream()
    return counts


def ensemble_inputs(max_tokens: int) -> list[tc.InferInput]:
    return [tensor("text_input", np.array([[PROMPT.encode()]], dtype=object), "BYTES"),
            tensor("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
            tensor("min_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
            tensor("stream", np.array([[True]], dtype=bool), "BOOL")]


def llm_inputs(ids: list[int]) -> list[tc.InferInput]:
    return [tensor("input_ids", np.array([ids], dtype=np.int32), "INT32"),
            tensor("input_lengths", np.array([[len(ids)]], dtype=np.int32), "INT32"),
            tensor("request_output_len", np.array([[MAX_TOKENS]], dtype=np.int32), "INT32")]


def test_ensemble_requests_count_on_every_composing_model(grpc_server: ServerProcess,
                                                           client: tc.InferenceServerClient) -> None:
    start = server_side_status(client, ENSEMBLE)
    with pytest.raises(PerfAnalyzerError, match="failed to find the requested model version"):
        summarize(client, ENSEMBLE, start, start)       # a window in which nothing ran: perf_analyzer stops
    counts: list[list[int]] = [[] for _ in range(3)]
    threads = [threading.Thread(target=lambda i=i: counts[i].extend(
        stream_requests(grpc_server.target, "ensemble", ensemble_inputs(MAX_TOKENS), 2))) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    num_responses = sum(sum(c) for c in counts)
    assert [len(c) for c in counts] == [2, 2, 2]
    fails = {name: _fail_count(client, name) for name in ("ensemble", "preprocessing", "tensorrt_llm")}
    with pytest.raises(RuntimeError, match="max_tokens"):
        stream_requests(grpc_server.target, "ensemble", ensemble_inputs(0), 1)
    end = server_side_status(client, ENSEMBLE)

    summary = summarize(client, ENSEMBLE, start, end)
    assert summary.counters.success_count == summary.counters.queue_count == 6
    assert summary.counters.inference_count == summary.counters.execution_count == 6
    by_name = {name: stats.counters for (name, version), stats in summary.composing.items()}
    assert set(by_name) == {"preprocessing", "tensorrt_llm", "postprocessing"}
    assert {v for (_, v) in summary.composing} == {"1"}
    assert by_name["preprocessing"].success_count == by_name["tensorrt_llm"].success_count == 6
    assert by_name["postprocessing"].success_count == num_responses          # one execution per response
    for counters in by_name.values():
        assert counters.queue_count == counters.compute_infer_count == counters.success_count
    # each ensemble request contains its engine execution; the engine's time is where the time goes
    assert summary.counters.cumm_time_ns >= by_name["tensorrt_llm"].cumm_time_ns > 0
    assert by_name["tensorrt_llm"].compute_infer_time_ns > by_name["postprocessing"].cumm_time_ns
    # the refused request failed on the ensemble and on the step that refused it, and nowhere else
    assert {name: _fail_count(client, name) - before for name, before in fails.items()} == {
        "ensemble": 1, "preprocessing": 1, "tensorrt_llm": 0}


def test_direct_requests_count_only_on_their_model(grpc_server: ServerProcess,
                                                       client: tc.InferenceServerClient) -> None:
    start = read_statistics(client)
    for ids in ([10, 20, 30], [40, 50]):
        stream_requests(grpc_server.target, "tensorrt_llm", llm_inputs(ids), 1)
    end = read_statistics(client)
    for model in (LLM, ("tensorrt_llm", "1")):                # perf_analyzer without and with -x 1
        summary = summarize(client, model, start, end)
        assert summary.counters.success_count == summary.counters.compute_output_count == 2
    assert end[("ensemble", "1")] == start[("ensemble", "1")]
    # a unary ModelInfer (preprocessing is not decoupled) counts the same way, on that model only
    client.infer("preprocessing", [tensor("QUERY", np.array([[PROMPT.encode()]], dtype=object), "BYTES"),
                                   tensor("REQUEST_OUTPUT_LEN", np.array([[4]], dtype=np.int32), "INT32")])
    after = read_statistics(client)
    pre = summarize(client, ("preprocessing", ""), end, after).counters
    assert pre.success_count == pre.queue_count == pre.compute_infer_count == pre.inference_count == 1
    assert after[("tensorrt_llm", "1")] == end[("tensorrt_llm", "1")]
    last = client.get_inference_statistics("tensorrt_llm").model_stats[0].last_inference
    assert last > 0


def _fail_count(client: tc.InferenceServerClient, name: str) -> int:
    return client.get_inference_statistics(name).model_stats[0].inference_stats.fail.count


# --------------------------------------------------------------------------- perf_analyzer itself

def run_perf_analyzer(model: str, data: dict, tmp_path: Path, target: str, *extra: str) -> str:
    data_file = tmp_path / f"{model}.json"
    data_file.write_text(json.dumps({"data": [data]}))
    command = [str(PERF_ANALYZER), "-m", model, *extra, "-i", "grpc", "--streaming", "-u", target,
               "--input-data", str(data_file), "--concurrency-range", "1:4:3", "-s", "100", "--max-trials", "20",
               # levels 1 and 4 (one stream, several at once; 2 and 3 take no other path); windows of 6 completed
               # requests (not of fixed time): a loaded CI machine never gets an empty one
               "--measurement-mode", "count_windows", "--measurement-request-count", "6"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.skipif(not PERF_ANALYZER.is_file(), reason="perf_analyzer not fetched: make test runs "
                                                         "benchmarks/get_perf_analyzer.sh first")
def test_perf_analyzer_streaming_against_server_counters(grpc_server: ServerProcess,
                                                         client: tc.InferenceServerClient, tmp_path: Path) -> None:
    fixed = {"min_tokens": {"content": [8], "shape": [1]}}
    runs = {
        "ensemble": ({"text_input": {"content": [PROMPT], "shape": [1]},
                      "max_tokens": {"content": [8], "shape": [1]}, "stream": {"content": [True], "shape": [1]},
                      **fixed}, ()),
        "tensorrt_llm": ({"input_ids": {"content": [10, 20, 30, 40, 50, 60], "shape": [6]},
                          "input_lengths": {"content": [6], "shape": [1]},
                          "request_output_len": {"content": [8], "shape": [1]},
                          "streaming": {"content": [True], "shape": [1]}, **fixed}, ("-x", "1")),
    }
    fail_before = {m: client.get_inference_statistics(m).model_stats[0].inference_stats.fail.count for m in runs}
    for model, (data, extra) in runs.items():
        before = read_statistics(client)
        levels = parse_report(run_perf_analyzer(model, data, tmp_path, grpc_server.target, *extra))
        after = read_statistics(client)
        assert [level.concurrency for level in levels] == [1, 4]
        for level in levels:
            # perf_analyzer counts requests that ended in its windows, the server those it finished between
            # its statistics reads of the same windows: at most the requests in flight at each edge differ
            # (3 windows merged); the throughputs it reports are these counts over the same duration
            slack = 3 * level.concurrency
            assert level.client_request_count > 0 and level.throughput > 0
            assert abs(level.server_success_count - level.client_request_count) <= slack, level
            if model == "ensemble":
                for step in ("preprocessing", "tensorrt_llm"):
                    assert abs(level.composing_success_counts[step] - level.server_success_count) <= slack, level
                assert level.composing_success_counts["postprocessing"] >= level.server_success_count
        own = after[(model, "1")].minus(before.get((model, "1"), Counters()))
        assert own.success_count >= sum(level.client_request_count for level in levels)
        assert own.compute_input_count == own.compute_infer_count == own.compute_output_count == own.success_count
        failed = {m: client.get_inference_statistics(m).model_stats[0].inference_stats.fail.count for m in runs}
        assert failed == fail_before, "perf_analyzer waits for every request it sent"
