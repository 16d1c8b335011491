"""The KServe v2 API with an unmodified tritonclient, as Triton TensorRT-LLM backend clients use it:
metadata, config, readiness, streaming and non-streaming on `ensemble` and `tensorrt_llm`, pre/post-processing,
cancellation by id, and INVALID_ARGUMENT naming the tensor for malformed tensors."""
from __future__ import annotations

import queue
import struct

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from tests.helpers.grpc_fixtures import Reference, ServerProcess

TIMEOUT_S = 60


def tensor(name: str, array: np.ndarray, datatype: str) -> tc.InferInput:
    t = tc.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def ensemble_inputs(prompt: str, max_tokens: int, stream: bool, **extra: tuple[np.ndarray, str]) -> list:
    inputs = [tensor("text_input", np.array([[prompt.encode()]], dtype=object), "BYTES"),
              tensor("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
              tensor("stream", np.array([[stream]], dtype=bool), "BOOL")]
    return inputs + [tensor(name, array, datatype) for name, (array, datatype) in extra.items()]


class Stream:
    """A tritonclient stream with its callback results in a queue."""

    def __init__(self, client: tc.InferenceServerClient) -> None:
        self.client = client
        self.results: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: self.results.put((result, error)))

    def send(self, model: str, inputs: list, request_id: str, **kw: object) -> None:
        self.client.async_stream_infer(model, inputs, request_id=request_id, **kw)

    def until_final(self, request_id: str | None = None) -> list:
        """Results up to and including the one flagged triton_final_response (errors raise)."""
        got = []
        while True:
            result, error = self.results.get(timeout=TIMEOUT_S)
            if error is not None:
                raise error
            got.append(result)
            response = result.get_response()
            assert request_id is None or response.id == request_id
            if response.parameters["triton_final_response"].bool_param:
                return got

    def next_error(self) -> InferenceServerException:
        result, error = self.results.get(timeout=TIMEOUT_S)
        assert error is not None, f"expected an error, got {result.get_response()}"
        return error

    def close(self) -> None:
        self.client.stop_stream(cancel_requests=True)


@pytest.fixture(scope="module")
def client(grpc_server: ServerProcess) -> tc.InferenceServerClient:
    triton = tc.InferenceServerClient(grpc_server.target)
    yield triton
    triton.close()


@pytest.fixture()
def stream(client: tc.InferenceServerClient) -> Stream:
    opened = Stream(client)
    yield opened
    opened.close()


def texts(results: list) -> list[str]:
    return [r.as_numpy("text_output").reshape(-1)[0].decode() for r in results]


def test_server_and_model_metadata(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata().name == "trtserve"
    for name in ("ensemble", "tensorrt_llm", "preprocessing", "postprocessing"):
        assert client.is_model_ready(name)
    meta = client.get_model_metadata("ensemble")
    inputs = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
    assert inputs["text_input"] == ("BYTES", [-1, 1]) and inputs["max_tokens"] == ("INT32", [-1, 1])
    assert inputs["seed"] == ("UINT64", [-1, 1]) and inputs["random_seed"] == ("UINT64", [-1, 1])
    assert inputs["bad_words"] == ("BYTES", [-1, -1]) and inputs["stream"] == ("BOOL", [-1, 1])
    outputs = {t.name: t.datatype for t in meta.outputs}
    assert outputs["text_output"] == "BYTES" and outputs["kv_cache_reused_blocks"] == "INT32"
    config = client.get_model_config("tensorrt_llm").config
    assert config.backend == "tensorrtllm" and config.model_transaction_policy.decoupled
    assert config.max_batch_size == 16
    assert {i.name for i in config.input} >= {"input_ids", "input_lengths", "request_output_len", "streaming"}
    stats = client.get_inference_statistics("ensemble")
    assert stats.model_stats[0].name == "ensemble"
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert index == {"ensemble": "READY", "tensorrt_llm": "READY", "preprocessing": "READY",
                     "postprocessing": "READY"}


@pytest.mark.parametrize("call", ["is_model_ready", "get_model_metadata", "get_model_config"])
def test_unknown_model_is_not_found(client: tc.InferenceServerClient, call: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        getattr(client, call)("no_such_model")
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_unary_infer_on_the_decoupled_ensemble_is_refused_like_triton(client: tc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer("ensemble", ensemble_inputs("hi", 4, False))
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "decoupled" in info.value.message()


def test_ensemble_streams_deltas_matching_the_engine(stream: Stream, reference: Reference) -> None:
    prompt = "def fibonacci(n):"
    expected, _ = reference.greedy(reference.encode(prompt), 20)
    stream.send("ensemble", ensemble_inputs(prompt, 20, True), "req-42")
    results = stream.until_final("req-42")
    assert len(results) > 1
    finals = [r.get_response().parameters["triton_final_response"].bool_param for r in results]
    assert finals == [False] * (len(results) - 1) + [True]
    assert "".join(texts(results)) == expected      # streaming sends only new text


def test_ensemble_non_streaming_echoes_the_prompt_unless_excluded(stream: Stream, reference: Reference) -> None:
    prompt = "Once upon a time"
    expected, _ = reference.greedy(reference.encode(prompt), 12)
    stream.send("ensemble", ensemble_inputs(prompt, 12, False), "echo")
    (result,) = stream.until_final("echo")
    assert texts([result]) == [prompt + expected]
    exclude = (np.array([[True]], dtype=bool), "BOOL")
    stream.send("ensemble", ensemble_inputs(prompt, 12, False, exclude_input_in_output=exclude), "no-echo")
    assert texts(stream.until_final("no-echo")) == [expected]


def test_empty_final_response_when_asked(stream: Stream, reference: Reference) -> None:
    expected, _ = reference.greedy(reference.encode("empty final"), 6)
    stream.send("ensemble", ensemble_inputs("empty final", 6, True), "ef", enable_empty_final_response=True)
    results = stream.until_final("ef")
    *data, last = results
    assert last.get_response().outputs == [] and last.as_numpy("text_output") is None
    assert not any(r.get_response().parameters["triton_final_response"].bool_param for r in data)
    assert "".join(texts(data)) == expected


def test_old_names_log_probs_and_perf_metrics(stream: Stream) -> None:
    prompt = "perf metrics prompt " * 6
    extra = {"min_length": (np.array([[8]], dtype=np.int32), "INT32"),
             "random_seed": (np.array([[11]], dtype=np.uint64), "UINT64"),
             "return_log_probs": (np.array([[True]]), "BOOL"),
             "return_perf_metrics": (np.array([[True]]), "BOOL"),
             "exclude_input_in_output": (np.array([[True]]), "BOOL")}
    for request_id in ("first", "second"):
        stream.send("ensemble", ensemble_inputs(prompt, 8, False, **extra), request_id)
        (result,) = stream.until_final(request_id)
    log_probs = result.as_numpy("output_log_probs")
    assert log_probs.shape == (1, 1, 8) and np.all(log_probs <= 0)
    assert result.as_numpy("cum_log_probs")[0, 0] == pytest.approx(float(log_probs.sum()), rel=1e-4)
    assert result.as_numpy("kv_cache_reused_blocks")[0, 0] >= 1           # the second request hit the cache
    total = result.as_numpy("kv_cache_alloc_total_blocks")[0, 0]
    assert total == result.as_numpy("kv_cache_reused_blocks")[0, 0] + result.as_numpy(
        "kv_cache_alloc_new_blocks")[0, 0]
    assert result.as_numpy("first_token_time_ns")[0, 0] >= result.as_numpy("arrival_time_ns")[0, 0] > 0


def test_tensorrt_llm_ids_in_ids_out(stream: Stream, reference: Reference) -> None:
    ids = reference.encode("token ids in")
    _, expected = reference.greedy(ids, 10)
    inputs = [tensor("input_ids", np.array([ids], dtype=np.int32), "INT32"),
              tensor("input_lengths", np.array([[len(ids)]], dtype=np.int32), "INT32"),
              tensor("request_output_len", np.array([[10]], dtype=np.int32), "INT32"),
              tensor("streaming", np.array([[True]]), "BOOL")]
    stream.send("tensorrt_llm", inputs, "ids")
    results = stream.until_final("ids")
    streamed = [int(t) for r in results for t in r.as_numpy("output_ids").reshape(-1)]
    assert streamed == expected
    inputs[3] = tensor("streaming", np.array([[False]]), "BOOL")
    stream.send("tensorrt_llm", inputs, "ids-whole")
    (whole,) = stream.until_final("ids-whole")
    assert list(whole.as_numpy("output_ids")[0, 0]) == ids + expected     # prompt echoed by default
    assert whole.as_numpy("sequence_length")[0, 0] == len(ids) + len(expected)


def test_preprocessing_and_postprocessing(client: tc.InferenceServerClient, reference: Reference) -> None:
    pre = client.infer("preprocessing", [
        tensor("QUERY", np.array([[b"hello world"]], dtype=object), "BYTES"),
        tensor("REQUEST_OUTPUT_LEN", np.array([[5]], dtype=np.int32), "INT32"),
        tensor("STOP_WORDS_DICT", np.array([[b"world", b""]], dtype=object), "BYTES")])
    ids = list(pre.as_numpy("INPUT_ID")[0])
    assert ids == reference.encode("hello world")
    assert pre.as_numpy("REQUEST_INPUT_LEN")[0, 0] == len(ids)
    stop = pre.as_numpy("STOP_WORDS_IDS")[0]
    assert list(stop[1][:1]) == [len(reference.encode("world"))]
    post = client.infer("postprocessing", [
        tensor("TOKENS_BATCH", np.array([[ids]], dtype=np.int32), "INT32"),
        tensor("SEQUENCE_LENGTH", np.array([[len(ids)]], dtype=np.int32), "INT32")])
    assert post.as_numpy("OUTPUT").reshape(-1)[0].decode() == "hello world"


def test_cancel_by_id_with_stop(stream: Stream) -> None:
    inputs = ensemble_inputs("cancel me", 1500, True, min_tokens=(np.array([[1500]], dtype=np.int32), "INT32"))
    stream.send("ensemble", inputs, "long-one")
    first, error = stream.results.get(timeout=TIMEOUT_S)
    assert error is None and first.get_response().id == "long-one"
    stop = [tensor("text_input", np.array([[b""]], dtype=object), "BYTES"),
            tensor("max_tokens", np.array([[1]], dtype=np.int32), "INT32"),
            tensor("stop", np.array([[True]]), "BOOL")]
    stream.send("ensemble", stop, "long-one")
    results = stream.until_final("long-one")
    assert len(results) < 1400                    # ended early, with a final response


BAD_TENSORS = [
    ("unknown tensor", lambda: ensemble_inputs("hi", 4, True) + [
        tensor("no_such_input", np.array([[1]], dtype=np.int32), "INT32")], "no_such_input"),
    ("missing max_tokens", lambda: [tensor("text_input", np.array([[b"hi"]], dtype=object), "BYTES")],
     "max_tokens"),
    ("mistyped max_tokens", lambda: [tensor("text_input", np.array([[b"hi"]], dtype=object), "BYTES"),
                                     tensor("max_tokens", np.array([[4]], dtype=np.int64), "INT64")], "max_tokens"),
    ("duplicate tensor", lambda: ensemble_inputs("hi", 4, True) + [
        tensor("max_tokens", np.array([[4]], dtype=np.int32), "INT32")], "max_tokens"),
    ("shape without batch dim", lambda: [tensor("text_input", np.array([b"hi"], dtype=object), "BYTES"),
                                         tensor("max_tokens", np.array([[4]], dtype=np.int32), "INT32")],
     "text_input"),
    ("invalid UTF-8", lambda: ensemble_inputs("hi", 4, True)[1:] + [
        tensor("text_input", np.array([[b"\xff\xfe"]], dtype=object), "BYTES")], "text_input"),
    ("empty prompt", lambda: ensemble_inputs("", 4, True), "prompt"),
    ("max_tokens 0", lambda: ensemble_inputs("hi", 0, True), "max_tokens"),
    ("max_tokens negative", lambda: ensemble_inputs("hi", -5, True), "max_tokens"),
    ("NaN temperature", lambda: ensemble_inputs("hi", 4, True, temperature=(
        np.array([[np.nan]], dtype=np.float32), "FP32")), "temperature"),
    ("negative top_p", lambda: ensemble_inputs("hi", 4, True, top_p=(
        np.array([[-0.5]], dtype=np.float32), "FP32")), "top_p"),
    ("beam search", lambda: ensemble_inputs("hi", 4, True, beam_width=(
        np.array([[2]], dtype=np.int32), "INT32")), "beam_width"),
    ("prompt over max_input_len", lambda: ensemble_inputs("word " * 1100, 4, True), "text_input"),
    ("prompt + max_tokens over max_seq_len", lambda: ensemble_inputs("hi", 2048, True), "max_seq_len"),
    ("end_id outside vocab", lambda: ensemble_inputs("hi", 4, True, end_id=(
        np.array([[99999]], dtype=np.int32), "INT32")), "end_id"),
]


@pytest.mark.parametrize("label,make,needle", BAD_TENSORS, ids=[b[0] for b in BAD_TENSORS])
def test_bad_stream_request_gets_an_error_naming_the_tensor(stream: Stream, label: str, make, needle: str) -> None:
    stream.send("ensemble", make(), f"bad-{label}")
    error = stream.next_error()
    assert needle in error.message(), (label, error.message())
    stream.send("ensemble", ensemble_inputs("after the error", 2, True), "good")   # the stream goes on
    assert stream.until_final("good")


def test_raw_byte_size_mismatch_is_invalid_argument(grpc_server: ServerProcess) -> None:
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name="preprocessing")
    request.inputs.add(name="QUERY", datatype="BYTES", shape=[1, 1])
    request.inputs.add(name="REQUEST_OUTPUT_LEN", datatype="INT32", shape=[1, 1])
    request.raw_input_contents.extend([struct.pack("<I", 2) + b"hi", b"\x01\x00\x00\x00\x00\x00"])
    with grpc.insecure_channel(grpc_server.target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "REQUEST_OUTPUT_LEN" in info.value.details() and "byte size" in info.value.details()
        del request.raw_input_contents[:]
        request.raw_input_contents.extend([struct.pack("<I", 9) + b"hi", struct.pack("<i", 4)])
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "QUERY" in info.value.details()


def test_usage_of_the_backends_example_clients(client: tc.InferenceServerClient, reference: Reference) -> None:
    """What tensorrtllm_backend's end-to-end and inflight-batcher clients send: temperature and beam_width always,
    every perf-metric output requested by name, the stream half-closed right after sending, and a stop signal
    to tensorrt_llm with placeholder ids and zero lengths."""
    prompt = "The capital of France is"
    expected, expected_ids = reference.greedy(reference.encode(prompt), 12)
    extra = {"beam_width": (np.array([[1]], dtype=np.int32), "INT32"),
             "temperature": (np.array([[1.0]], dtype=np.float32), "FP32"),     # greedy: no top_k / top_p
             "num_return_sequences": (np.array([[1]], dtype=np.int32), "INT32"),
             "return_perf_metrics": (np.array([[True]]), "BOOL"),
             "stop_words": (np.array([[b""]], dtype=object), "BYTES"),
             "bad_words": (np.array([[b""]], dtype=object), "BYTES")}
    names = ["text_output", "kv_cache_alloc_new_blocks", "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks",
             "arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns",
             "acceptance_rate", "total_accepted_draft_tokens", "total_draft_tokens"]
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("ensemble", ensemble_inputs(prompt, 12, True, **extra), request_id="1",
                              outputs=[tc.InferRequestedOutput(n) for n in names])
    client.stop_stream()                  # half-close: the server still answers, then ends the stream
    got = []
    while not results.empty():
        result, error = results.get()
        assert error is None, error
        got.append(result)
    assert {o.name for o in got[-1].get_response().outputs} == set(names)
    times = [int(got[-1].as_numpy(n)[0, 0]) for n in names if n.endswith("_time_ns")]
    assert times[0] > 0 and times == sorted(times), times      # arrival <= scheduled <= first <= last token
    assert "".join(texts(got)) == expected and got[-1].as_numpy("acceptance_rate")[0, 0] == 0.0

    ids = reference.encode(prompt)
    llm = [tensor("input_ids", np.array([ids], dtype=np.int32), "INT32"),
           tensor("input_lengths", np.array([[len(ids)]], dtype=np.int32), "INT32"),
           tensor("request_output_len", np.array([[1500]], dtype=np.int32), "INT32"),
           tensor("beam_width", np.array([[1]], dtype=np.int32), "INT32"),
           tensor("temperature", np.array([[1.0]], dtype=np.float32), "FP32"),
           tensor("streaming", np.array([[True]]), "BOOL"),
           tensor("end_id", np.array([[reference.core.engine.eos_token_ids[0]]], dtype=np.int32), "INT32"),
           tensor("pad_id", np.array([[reference.core.engine.pad_token_id or 0]], dtype=np.int32), "INT32"),
           tensor("runtime_top_k", np.array([[1]], dtype=np.int32), "INT32"),
           tensor("runtime_top_p", np.array([[0.0]], dtype=np.float32), "FP32"),
           tensor("min_tokens", np.array([[1500]], dtype=np.int32), "INT32")]
    stop_signal = [tensor("input_ids", np.empty((1, 1), dtype=np.int32), "INT32"),
                   tensor("input_lengths", np.zeros((1, 1), dtype=np.int32), "INT32"),
                   tensor("request_output_len", np.zeros((1, 1), dtype=np.int32), "INT32"),
                   tensor("stop", np.array([[True]]), "BOOL")]
    stream = Stream(client)
    try:
        stream.send("tensorrt_llm", llm, "7")
        first, error = stream.results.get(timeout=TIMEOUT_S)
        # A client that falls behind gets its pending deltas merged into one response, so the first
        # one carries at least one token: a non-empty prefix of the greedy ids.
        first_ids = list(first.as_numpy("output_ids").reshape(-1))
        assert error is None and first_ids and first_ids == expected_ids[:len(first_ids)]
        stream.send("tensorrt_llm", stop_signal, "7")
        assert len(stream.until_final("7")) < 1400
    finally:
        stream.close()
