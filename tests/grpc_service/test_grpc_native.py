"""The native API against a real server subprocess: streaming, chat, tokenize, health, reflection, deadlines,
and the text-request bad inputs of REFERENCE.md section 6 (clear status, server still serving, nothing leaked)."""
from __future__ import annotations

import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from grpc_service.client import NativeClient, Sampling
from grpc_service.proto import trtserve_pb2 as pb
from grpc_service.proto import trtserve_pb2_grpc
from tests.helpers.grpc_fixtures import Reference, ServerProcess, assert_idle


@pytest.fixture(scope="module")
def client(grpc_server: ServerProcess) -> NativeClient:
    with NativeClient(grpc_server.target, timeout_s=60) as native:
        yield native


@pytest.fixture(scope="module")
def stub(grpc_server: ServerProcess) -> trtserve_pb2_grpc.LLMServiceStub:
    channel = grpc.insecure_channel(grpc_server.target)
    yield trtserve_pb2_grpc.LLMServiceStub(channel)
    channel.close()


def test_models_and_info(client: NativeClient, reference: Reference) -> None:
    cards = client.models()
    assert [c.name for c in cards] == [reference.core.engine.name]
    card = cards[0]
    assert card.ready and card.max_input_len == 1024 and card.max_seq_len == 2048 and card.has_chat_template
    info = client.model_info(card.name)
    assert info.status.kv_total_blocks > 0 and info.status.max_in_flight == 16 + 64


def test_streamed_text_matches_in_process_engine(client: NativeClient, reference: Reference) -> None:
    prompt = "The capital of France is"
    expected_text, expected_ids = reference.greedy(reference.encode(prompt), 24)
    responses = list(client.stream(prompt, Sampling(max_tokens=24), request_id="client-7"))
    assert len(responses) > 1, "the answer must be streamed, not sent at once"
    assert all(r.request_id == "client-7" for r in responses)
    assert [r.finished for r in responses] == [False] * (len(responses) - 1) + [True]
    assert "".join(r.text for r in responses) == expected_text
    assert [t for r in responses for t in r.token_ids] == expected_ids
    last = responses[-1]
    assert last.finish_reason in ("stop", "length")
    assert last.usage.prompt_tokens == len(reference.encode(prompt))
    assert last.usage.completion_tokens == len(expected_ids)


def test_chat_uses_the_chat_template(client: NativeClient, reference: Reference) -> None:
    messages = [("system", "You are terse."), ("user", "Write one sentence about the sea.")]
    expected_text, _ = reference.greedy(reference.encode_chat(messages), 16)
    completion = client.chat(messages, Sampling(max_tokens=16))
    assert completion.text == expected_text
    assert completion.prompt_tokens == len(reference.encode_chat(messages))


def test_token_id_prompt_and_tokenize_roundtrip(client: NativeClient, reference: Reference) -> None:
    ids = client.tokenize("Once upon a time")
    assert ids == reference.encode("Once upon a time")
    assert client.detokenize(ids) == "Once upon a time"
    chat_ids = client.tokenize([("user", "hi")])
    assert chat_ids == reference.encode_chat([("user", "hi")])
    completion = client.generate(ids, Sampling(max_tokens=8))
    assert completion.token_ids == reference.greedy(ids, 8)[1]


def test_repeated_prompt_reuses_the_prefix_cache(client: NativeClient) -> None:
    prompt = "shared prefix " * 20
    num_prompt_tokens = len(client.tokenize(prompt))
    block_size = client.models()[0].tokens_per_block
    client.generate(prompt, Sampling(max_tokens=2))
    again = client.generate(prompt, Sampling(max_tokens=2))
    # Every full block but the one holding the last prompt token (the model must compute that token).
    expected = (num_prompt_tokens - 1) // block_size * block_size
    assert expected >= block_size and again.cached_tokens == expected


def test_health_and_reflection(grpc_server: ServerProcess) -> None:
    with grpc.insecure_channel(grpc_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "trtserve.v1.LLMService", "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answer = next(reflection.ServerReflectionInfo(iter([request])))
        names = {s.name for s in answer.list_services_response.service}
        assert {"trtserve.v1.LLMService", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


BAD_REQUESTS = [
    ("empty prompt", pb.GenerateRequest(text=""), "prompt"),
    ("no prompt", pb.GenerateRequest(), "prompt"),
    ("prompt over max_input_len", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 1025)), "max_input_len"),
    ("prompt + max_tokens over max_seq_len",
     pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 1000), sampling=pb.SamplingParameters(max_tokens=1100)),
     "max_seq_len"),
    ("max_tokens 0", pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(max_tokens=0)), "max_tokens"),
    ("max_tokens negative", pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(max_tokens=-1)),
     "max_tokens"),
    ("max_tokens 2^31", pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(max_tokens=2**31)),
     "max_tokens"),
    ("token id outside vocab", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2056])), "vocabulary"),
    ("negative token id", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[-1])), "vocabulary"),
    ("NaN temperature", pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(temperature=math.nan)),
     "temperature"),
    ("inf temperature", pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(temperature=math.inf)),
     "temperature"),
    ("negative temperature", pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(temperature=-0.5)),
     "temperature"),
    ("NaN top_p", pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(top_p=math.nan)), "top_p"),
    ("negative top_k", pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(top_k=-3)), "top_k"),
    ("negative presence penalty", pb.GenerateRequest(
        text="hi", sampling=pb.SamplingParameters(presence_penalty=-7.0)), "presence_penalty"),
    ("images on a text model", pb.GenerateRequest(text="hi", images=[pb.Image(data=b"\x89PNG")]), "images"),
    ("bad chat role", pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="x", content="y")])),
     "role"),
]


@pytest.mark.parametrize("label,request_,needle", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_invalid_argument(stub: trtserve_pb2_grpc.LLMServiceStub, label: str,
                                       request_: pb.GenerateRequest, needle: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request_, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (label, info.value.details())
    assert needle in info.value.details(), (label, info.value.details())


def test_top_k_beyond_vocab_is_clamped(client: NativeClient, reference: Reference) -> None:
    ids = reference.encode("clamp me")
    clamped = client.generate(ids, Sampling(max_tokens=4, temperature=1.0, top_k=10**9, seed=3, ignore_eos=True))
    no_top_k = client.generate(ids, Sampling(max_tokens=4, temperature=1.0, top_k=0, seed=3, ignore_eos=True))
    assert clamped.finish_reason == "length" and len(clamped.token_ids) == 4
    assert clamped.token_ids == no_top_k.token_ids        # the same seeded draws from the same distribution


def test_unknown_and_malformed_model_names(stub: trtserve_pb2_grpc.LLMServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(model="nope", text="hi"), timeout=30))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfo(pb.ModelInfoRequest(model="../../etc/passwd"), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_invalid_utf8_and_oversized_messages(grpc_server: ServerProcess) -> None:
    with grpc.insecure_channel(grpc_server.target) as channel:
        generate = channel.unary_stream("/trtserve.v1.LLMService/Generate", request_serializer=lambda b: b,
                                        response_deserializer=pb.GenerateResponse.FromString)
        # field 3 (text), length 2, bytes 0xff 0xfe: not UTF-8
        with pytest.raises(grpc.RpcError) as info:
            list(generate(b"\x1a\x02\xff\xfe", timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in info.value.details()
    with grpc.insecure_channel(grpc_server.target,
                               options=[("grpc.max_send_message_length", 128 << 20)]) as channel:
        stub = trtserve_pb2_grpc.LLMServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(text="x" * (65 << 20)), timeout=60))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_deadline_exceeded_aborts_the_request(stub: trtserve_pb2_grpc.LLMServiceStub, client: NativeClient) -> None:
    request = pb.GenerateRequest(text="deadline", sampling=pb.SamplingParameters(
        max_tokens=1900, ignore_eos=True, temperature=0.0))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request, timeout=0.3))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_still_serving_and_nothing_leaked(client: NativeClient) -> None:
    """After every refusal above: the server answers, no request is in flight, no KV block is held."""
    assert client.generate("still alive?", Sampling(max_tokens=4)).completion_tokens >= 1
    assert_idle(client)
