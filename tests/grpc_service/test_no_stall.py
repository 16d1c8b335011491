"""No request can stall the server: requests with oversized lists (a million stop strings, hundreds of thousands
of bad words, millions of token ids, chat messages) are refused with INVALID_ARGUMENT naming the field and the
limit, through both APIs, while a health check, a metrics scrape, a short generate and a cancellation made at
the same time still complete (within a generous bound: before the limits, one such request held the health
check for 21.7 s)."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from grpc_service.client import NativeClient, Sampling
from grpc_service.proto import trtserve_pb2 as pb
from tests.helpers.grpc_fixtures import ServerProcess, assert_idle
from runtime.sampling_params import MAX_BAD_WORD_TOKENS, MAX_BAD_WORDS, MAX_STOP_STRINGS

HEALTH_BOUND_S = 5.0          # generous: an idle server answers in about a millisecond
GENERATE_BOUND_S = 20.0       # a 4-token generate, on a shared 2-core CPU under this test's own load


def native_error(target: str, request: pb.GenerateRequest | pb.DetokenizeRequest) -> grpc.RpcError:
    with NativeClient(target, timeout_s=120) as client:
        with pytest.raises(grpc.RpcError) as info:
            if isinstance(request, pb.DetokenizeRequest):
                client.stub.Detokenize(request, timeout=120)
            else:
                list(client.stub.Generate(request, timeout=120))
    return info.value


def triton_error(target: str, model: str, inputs: list[tc.InferInput]) -> str:
    done = threading.Event()
    errors: list[str] = []
    with tc.InferenceServerClient(target) as client:
        client.start_stream(callback=lambda result, error: (errors.append(str(error)) if error else None,
                                                            done.set()))
        try:
            client.async_stream_infer(model, inputs)
            assert done.wait(120)
        finally:
            client.stop_stream()
    assert errors, "the oversized request was served"
    return errors[0]


def tensor(name: str, array: np.ndarray, datatype: str) -> tc.InferInput:
    t = tc.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def heavy_requests(target: str) -> dict[str, Callable[[], tuple[str, str]]]:
    """name -> a call returning (status or error text, expected fragment)."""
    words = [f"word{i}".encode() for i in range(300_000)]

    def native_stop() -> tuple[str, str]:
        request = pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(
            max_tokens=4, stop=[f"stop{i}" for i in range(1_000_000)]))
        error = native_error(target, request)
        return f"{error.code().name} {error.details()}", f"stop: 1000000 entries exceed the limit of {MAX_STOP_STRINGS}"

    def native_bad_words() -> tuple[str, str]:
        request = pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(
            max_tokens=4, bad_words=[w.decode() for w in words]))
        error = native_error(target, request)
        return f"{error.code().name} {error.details()}", f"bad_words: 300000 entries exceed the limit of {MAX_BAD_WORDS}"

    def native_token_ids() -> tuple[str, str]:
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 4_000_000),
                                     sampling=pb.SamplingParameters(max_tokens=4))
        error = native_error(target, request)
        return f"{error.code().name} {error.details()}", "token_ids: prompt (4000000 tokens) exceeds max_input_len"

    def native_detokenize() -> tuple[str, str]:
        error = native_error(target, pb.DetokenizeRequest(token_ids=[5] * 4_000_000))
        return f"{error.code().name} {error.details()}", "token_ids: 4000000 token ids exceed the limit of max_seq_len"

    def native_chat() -> tuple[str, str]:
        chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="x")] * 200_000)
        error = native_error(target, pb.GenerateRequest(chat=chat, sampling=pb.SamplingParameters(max_tokens=4)))
        return f"{error.code().name} {error.details()}", "chat.messages: 200000 messages exceed the limit of"

    def native_chat_parts() -> tuple[str, str]:
        message = pb.ChatMessage(role="user", parts=[pb.ContentPart(text="x")] * 200_000)
        error = native_error(target, pb.GenerateRequest(chat=pb.ChatMessages(messages=[message]),
                                                        sampling=pb.SamplingParameters(max_tokens=4)))
        return f"{error.code().name} {error.details()}", "chat.messages: 200000 content parts exceed the limit of"

    def native_images() -> tuple[str, str]:
        request = pb.GenerateRequest(text="hi", images=[pb.Image(data=b"x")] * 200_000,
                                     sampling=pb.SamplingParameters(max_tokens=4))
        error = native_error(target, request)
        return f"{error.code().name} {error.details()}", "is text-only; it accepts no images or videos"

    def triton_bad_words() -> tuple[str, str]:
        inputs = [tensor("text_input", np.array([[b"hi"]], dtype=object), "BYTES"),
                  tensor("max_tokens", np.array([[4]], dtype=np.int32), "INT32"),
                  tensor("bad_words", np.array([words], dtype=object), "BYTES")]
        return ("INVALID_ARGUMENT " + triton_error(target, "ensemble", inputs),
                f"bad_words: 300000 entries exceed the limit of {MAX_BAD_WORDS}")

    def triton_stop_words() -> tuple[str, str]:
        inputs = [tensor("text_input", np.array([[b"hi"]], dtype=object), "BYTES"),
                  tensor("max_tokens", np.array([[4]], dtype=np.int32), "INT32"),
                  tensor("stop_words", np.array([[b"s"] * 1_000_000], dtype=object), "BYTES")]
        return ("INVALID_ARGUMENT " + triton_error(target, "ensemble", inputs),
                f"stop_words: 1000000 entries exceed the limit of {MAX_STOP_STRINGS}")

    def triton_bad_words_list() -> tuple[str, str]:
        layout = np.full((1, 2, 1_000_000), -1, dtype=np.int32)
        layout[0, 0] = 5
        inputs = [tensor("input_ids", np.array([[1, 2, 3]], dtype=np.int32), "INT32"),
                  tensor("input_lengths", np.array([[3]], dtype=np.int32), "INT32"),
                  tensor("request_output_len", np.array([[4]], dtype=np.int32), "INT32"),
                  tensor("bad_words_list", layout, "INT32")]
        return ("INVALID_ARGUMENT " + triton_error(target, "tensorrt_llm", inputs),
                f"bad_words_list: 1000000 token ids exceed the limit of {MAX_BAD_WORD_TOKENS}")

    def triton_input_ids() -> tuple[str, str]:
        inputs = [tensor("input_ids", np.full((1, 4_000_000), 5, dtype=np.int32), "INT32"),
                  tensor("input_lengths", np.array([[4_000_000]], dtype=np.int32), "INT32"),
                  tensor("request_output_len", np.array([[4]], dtype=np.int32), "INT32")]
        return ("INVALID_ARGUMENT " + triton_error(target, "tensorrt_llm", inputs),
                "input_ids: prompt (4000000 tokens) exceeds max_input_len")

    return {"native stop": native_stop, "native bad_words": native_bad_words, "native token_ids": native_token_ids,
            "native detokenize": native_detokenize, "native chat": native_chat,
            "native chat parts": native_chat_parts, "native images": native_images, "triton bad_words": triton_bad_words,
            "triton input_ids": triton_input_ids, "triton stop_words": triton_stop_words,
            "triton bad_words_list": triton_bad_words_list}


def test_oversized_requests_refused_while_others_are_served(grpc_server: ServerProcess) -> None:
    target = grpc_server.target
    results: dict[str, tuple[str, str]] = {}
    failures: list[BaseException] = []

    def run(name: str, call: Callable[[], tuple[str, str]]) -> None:
        try:
            results[name] = call()
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in heavy_requests(target).items()]
    for thread in threads:
        thread.start()
    health_s: list[float] = []
    generate_s: list[float] = []
    with NativeClient(target, timeout_s=60) as client:
        # a long request to cancel while the others are in flight
        long_stream = client.stream("Once upon a time", Sampling(max_tokens=400, min_tokens=400))
        assert next(long_stream).text is not None
        while any(t.is_alive() for t in threads) or not generate_s:
            start = time.monotonic()
            assert client.health() == "SERVING"
            health_s.append(time.monotonic() - start)
            grpc_server.metrics()
            start = time.monotonic()
            assert client.generate("The capital of France is", Sampling(max_tokens=4)).completion_tokens == 4
            generate_s.append(time.monotonic() - start)
        long_stream.cancel()
        for thread in threads:
            thread.join(60)
        assert not failures, failures
        for name, (text, fragment) in results.items():
            assert text.startswith("INVALID_ARGUMENT") and fragment in text, (name, text[:300])
        assert max(health_s) < HEALTH_BOUND_S, health_s
        assert max(generate_s) < GENERATE_BOUND_S, generate_s
        assert_idle(client)          # the cancelled request left; nothing leaked
