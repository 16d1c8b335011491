"""The OpenAI-compatible HTTP API with the real `openai` client against a live tiny server.

Greedy text equals the in-process EngineCore's; streamed and whole answers agree; n=3 samples reuse the
prompt's KV blocks; logprobs match the native API's; every error status (400 naming the field, 404, 413,
429, 503) arrives in OpenAI's error shape; a client that disconnects mid-stream leaves no KV block
held. Every response parses into the `openai` package's types with no field left over.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from grpc_service.client import NativeClient
from grpc_service.proto import trtserve_pb2 as pb
from tests.helpers.grpc_fixtures import Reference, ServerProcess, assert_idle, metric_value
from tests.helpers.openai_helpers import assert_no_extra_fields, openai_client

MODEL = "tiny-qwen2-fp32"     # build_tiny names the engine <preset>-<dtype>
MAX_BODY = 1 << 16               # the smallest --max-message-bytes the server accepts
MAX_IN_FLIGHT = 16               # tiny preset max_batch_size 16, --max-queue-size 0
USER = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def server(tiny_engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess.start(["--engine", str(tiny_engine_dir), "--max-message-bytes", str(MAX_BODY),
                                   "--max-queue-size", "0", "--grace-period", "300"],
                                  tmp_path_factory.mktemp("openai-logs"), own_group=True)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai_client(server)


@pytest.fixture(scope="module")
def native(server: ServerProcess) -> Iterator[NativeClient]:
    with NativeClient(server.target, timeout_s=120) as grpc_client:
        yield grpc_client


def test_own_group_is_a_process_group_in_our_session(server: ServerProcess) -> None:
    """own_group: a Ctrl-C at the terminal (the foreground group) misses the server, and the server stays in
    our session, so Linux's autogroup scheduler does not give it a separate share of the cores."""
    pid = server.process.pid
    assert os.getpgid(pid) == pid != os.getpgid(0) and os.getsid(pid) == os.getsid(0)


def test_models_and_health(server: ServerProcess, client: openai.OpenAI) -> None:
    page = client.models.list()
    assert [m.id for m in page.data] == [MODEL] and page.data[0].owned_by == "trtserve"
    assert_no_extra_fields(page.data[0])
    assert httpx.get(f"{server.http_url}/health").status_code == 200


def test_chat_greedy_matches_the_runtime(client: openai.OpenAI, reference: Reference) -> None:
    ids = reference.encode_chat([("user", USER[0]["content"])])
    expected_text, expected_ids = reference.greedy(ids, 12)
    response = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0,
                                              user="test-user")
    assert_no_extra_fields(response)
    choice = response.choices[0]
    assert choice.message.content == expected_text and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and response.object == "chat.completion"
    usage = response.usage
    assert usage.prompt_tokens == len(ids) and usage.completion_tokens == len(expected_ids) == 12
    assert usage.total_tokens == len(ids) + 12 and usage.prompt_tokens_details.cached_tokens >= 0
    # the same prompt again: its full blocks come from the prefix cache
    again = client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=12,
                                           temperature=0)
    assert again.choices[0].message.content == expected_text
    assert again.usage.prompt_tokens_details.cached_tokens == len(ids) // 16 * 16


def test_streamed_chat_equals_the_whole_answer(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    for chunk in chunks:
        assert_no_extra_fields(chunk)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    two = list(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, temperature=0, n=2,
                                              stream=True))
    for index in (0, 1):
        mine = [c.choices[0] for c in two if c.choices and c.choices[0].index == index]
        assert "".join(c.delta.content or "" for c in mine) == text
        assert [c.finish_reason for c in mine if c.finish_reason] == ["length"]


def test_n3_samples_share_the_prompt_blocks(server: ServerProcess, client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Samples that share this prompt: " + "blue green red " * 20}]
    before = metric_value(server.metrics(), "trtserve_cached_prompt_tokens_total", model=MODEL)
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                              temperature=1.0, seed=11, n=3)
    assert_no_extra_fields(response)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert len({c.message.content for c in response.choices}) > 1          # seeds 11, 12, 13 differ
    assert response.usage.completion_tokens == 24
    prompt_tokens = response.usage.prompt_tokens
    cached = metric_value(server.metrics(), "trtserve_cached_prompt_tokens_total", model=MODEL) - before
    # samples 2 and 3 reuse (at least) every full prompt block of sample 1; sample 1 prefilled it all
    assert 2 * (prompt_tokens // 16 * 16) <= cached < 2 * prompt_tokens
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                           temperature=1.0, seed=11, n=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in response.choices]


def test_chat_logprobs_match_the_native_api(client: openai.OpenAI, native: NativeClient) -> None:
    response = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=3)
    assert_no_extra_fields(response)
    content = response.choices[0].logprobs.content
    assert len(content) == 6 and all(len(entry.top_logprobs) == 3 for entry in content)
    request = pb.GenerateRequest(sampling=pb.SamplingParameters(max_tokens=6, temperature=0.0, logprobs=3),
                                 chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user",
                                                                               content=USER[0]["content"])]))
    native_logprobs = [lp for r in native.stub.Generate(request, timeout=60) for lp in r.logprobs]
    assert [e.logprob for e in content] == pytest.approx([lp.logprob for lp in native_logprobs], abs=1e-5)
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob for e in content)


def test_completions_text_ids_echo_and_stream(client: openai.OpenAI, reference: Reference) -> None:
    prompt = "def fibonacci(n):"
    ids = reference.encode(prompt)
    expected_text, _ = reference.greedy(ids, 8)
    for given in (prompt, ids):
        response = client.completions.create(model=MODEL, prompt=given, max_tokens=8, temperature=0)
        assert_no_extra_fields(response)
        assert response.choices[0].text == expected_text and response.usage.prompt_tokens == len(ids)
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + expected_text
    stop = expected_text[len(expected_text) // 2:][:3]
    stopped = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stop=stop)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == expected_text[:expected_text.index(stop)]
    batch = client.completions.create(model=MODEL, prompt=[prompt, "Once upon"], max_tokens=4,
                                      temperature=0, logprobs=2)
    assert [c.index for c in batch.choices] == [0, 1] and batch.usage.completion_tokens == 8
    assert len(batch.choices[0].logprobs.tokens) == 4 and len(batch.choices[0].logprobs.top_logprobs[0]) == 2
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    for chunk in chunks:
        assert_no_extra_fields(chunk)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected_text
    assert chunks[-1].usage.completion_tokens == 8


def _status(call: object) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()                                                          # type: ignore[operator]
    return info.value


def test_bad_requests_are_400_naming_the_field(server: ServerProcess, client: openai.OpenAI) -> None:
    create = client.chat.completions.create
    cases = {
        "temperature": lambda: create(model=MODEL, messages=USER, temperature=-1),
        "top_p": lambda: create(model=MODEL, messages=USER, top_p=1.5),
        "max_tokens": lambda: create(model=MODEL, messages=USER, max_tokens=0),
        "messages": lambda: create(model=MODEL, messages=[]),
        "messages[0].content[0].type": lambda: create(
            model=MODEL, messages=[{"role": "user", "content": [{"type": "input_audio"}]}]),
        "messages[0].content[0].image_url": lambda: create(
            model=MODEL, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]),
        "n": lambda: create(model=MODEL, messages=USER, n=100),
        "stop": lambda: create(model=MODEL, messages=USER, stop=["a", "b", "c", "d", "e"]),
        "logit_bias": lambda: create(model=MODEL, messages=USER, logit_bias={"1": 5}),
        "tool_choice.function.name": lambda: create(
            model=MODEL, messages=USER, tool_choice={"type": "function", "function": {"name": "g"}},
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    }
    for field_name, call in cases.items():
        error = _status(call)
        assert error.status_code == 400, (field_name, error.body)
        assert error.body["param"] == field_name and error.body["type"] == "invalid_request_error", error.body
        assert field_name in error.body["message"]
    raw = httpx.post(f"{server.http_url}/v1/chat/completions", content=b'{"messages": [{"role": "user", '
                     b'"content": "x"}], "top_k": NaN}', headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "top_k"
    raw = httpx.post(f"{server.http_url}/v1/completions", content=b"not json")
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "body"


def test_unknown_model_and_too_large(client: openai.OpenAI) -> None:
    error = _status(lambda: client.chat.completions.create(model="nope", messages=USER))
    assert error.status_code == 404 and error.body["code"] == "model_not_found" and error.body["param"] == "model"
    error = _status(lambda: client.completions.create(model=MODEL, prompt="x" * (MAX_BODY + 10)))
    assert error.status_code == 413 and "limit" in error.body["message"]


def test_disconnect_mid_stream_frees_the_kv_blocks(server: ServerProcess, native: NativeClient) -> None:
    body = {"model": MODEL, "messages": USER, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.http_url}/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert [next(lines) for _ in range(6)]
            assert native.model_info().status.kv_used_blocks > 0
    assert_idle(native)
    whole = {"model": MODEL, "messages": USER, "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):           # a non-streamed request whose client gives up
        httpx.post(f"{server.http_url}/v1/chat/completions", json=whole, timeout=0.5)
    assert_idle(native)


def test_queue_full_is_429(server: ServerProcess, client: openai.OpenAI, native: NativeClient) -> None:
    body = {"model": MODEL, "messages": USER, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=MAX_IN_FLIGHT + 4)) as http:
        streams = [http.stream("POST", f"{server.http_url}/v1/chat/completions", json=body)
                   for _ in range(MAX_IN_FLIGHT)]
        responses = [s.__enter__() for s in streams]
        try:
            assert all(r.status_code == 200 for r in responses)
            error = _status(lambda: client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2))
            assert error.status_code == 429 and error.body["code"] == "rate_limit_exceeded"
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)
    assert_idle(native)


def test_draining_server_answers_503(server: ServerProcess, client: openai.OpenAI) -> None:
    """Last in this module: SIGTERM with a request in flight; new requests get 503 while it finishes.

    The signal goes to the server's whole process group, as a container runtime or a terminal sends it, so
    the engine core process gets it too and must leave the draining to the server. The in-flight request
    streams 600 tokens and the signal goes only once its first chunk has arrived, so it is surely in flight
    when the signal comes; the grace period (300 s) lets it finish even on a heavily loaded machine."""
    finished: list[tuple[str, int]] = []
    first_chunk = threading.Event()

    def long_request() -> None:
        stream = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=600, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True})
        finish, tokens = "", 0
        for chunk in stream:
            first_chunk.set()
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        finished.append((finish, tokens))

    worker = threading.Thread(target=long_request)
    worker.start()
    assert first_chunk.wait(60), "the long request never streamed"
    os.killpg(server.process.pid, signal.SIGTERM)
    body = {"model": MODEL, "messages": USER, "max_tokens": 2}
    deadline = time.monotonic() + 30
    while True:
        response = httpx.post(f"{server.http_url}/v1/chat/completions", json=body, timeout=30)
        if response.status_code == 503 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "service_unavailable"
    assert httpx.get(f"{server.http_url}/health").status_code == 503
    worker.join(300)
    assert finished == [("length", 600)]
    assert server.process.wait(60) == 0
    log = server.log()
    assert "engine core process stopped (code 0)" in log and "failing every request" not in log
