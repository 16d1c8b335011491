"""Structured output through all three APIs of a live tiny server with random weights: 20 sampled requests
per kind, sent together (so constrained and unconstrained rows share batches), and every output parses and
validates (jsonschema, re.fullmatch); forced tool calls come back as parsed tool_calls; constructs that
would not be enforced are refused naming the field, with INVALID_ARGUMENT / 400.

`json_object` (any object) has unbounded strings: a random-weight model closes a string rarely, so some of
its 20 outputs reach max_tokens inside a string. Those end with finish_reason "length"; every output that
ended by itself must parse."""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import openai
import pytest

from grpc_service.client import NativeClient, Sampling, TritonClient, collect
from tests.helpers.grpc_fixtures import ServerProcess, assert_idle
from tests.helpers.openai_helpers import assert_no_extra_fields, openai_client

NUM_REQUESTS = 20
MAX_TOKENS = 160
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,5}$"}, "maxItems": 2},
    "active": {"type": "boolean"},
}, "required": ["name", "age", "role", "active"], "additionalProperties": False}
DATE = r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]"
SUM_GRAMMAR = 'root ::= "(" num ("+" num){0,3} ")"\nnum ::= [1-9] [0-9]{0,2}'
SUM = r"\([1-9][0-9]{0,2}(\+[1-9][0-9]{0,2}){0,3}\)"
WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"]}}},
           {"type": "function", "function": {"name": "get_time", "parameters": {
               "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}]
CASES = {"json_schema": (json.dumps(PERSON), lambda t: jsonschema.validate(json.loads(t), PERSON)),
         "regex": (DATE, lambda t: _fullmatch(DATE, t)),
         "ebnf": (SUM_GRAMMAR, lambda t: _fullmatch(SUM, t))}


def _fullmatch(pattern: str, text: str) -> None:
    assert re.fullmatch(pattern, text), text


def _json_object(text: str) -> None:
    assert isinstance(json.loads(text), dict)                    # strict: no raw control characters in strings


def _each(fn: Callable[[int], object]) -> list[object]:
    with ThreadPoolExecutor(NUM_REQUESTS) as pool:
        return list(pool.map(fn, range(NUM_REQUESTS)))


@pytest.fixture(scope="module")
def server(grpc_server: ServerProcess) -> ServerProcess:
    return grpc_server       # the session's default server (tests/conftest.py): these tests need no other flags


@pytest.fixture(scope="module")
def native(server: ServerProcess) -> Iterator[NativeClient]:
    with NativeClient(server.target, timeout_s=120) as client:
        yield client


@pytest.fixture(scope="module")
def oa(server: ServerProcess) -> openai.OpenAI:
    return openai_client(server)


@pytest.fixture(scope="module")
def model(native: NativeClient) -> str:
    return native.models()[0].name


def test_openai_response_format(oa: openai.OpenAI, model: str, native: NativeClient) -> None:
    def ask(response_format: dict, seed: int) -> tuple[str, str]:
        response = oa.chat.completions.create(model=model, messages=[{"role": "user", "content": f"JSON {seed}"}],
                                              max_tokens=MAX_TOKENS, temperature=1.0, seed=seed,
                                              response_format=response_format)     # type: ignore[arg-type]
        assert_no_extra_fields(response)
        return response.choices[0].message.content or "", response.choices[0].finish_reason

    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for text, reason in _each(lambda seed: ask(schema_format, seed)):        # type: ignore[misc]
        assert reason == "stop"
        jsonschema.validate(json.loads(text), PERSON)
    finished = 0
    for text, reason in _each(lambda seed: ask({"type": "json_object"}, seed)):   # type: ignore[misc]
        if reason == "stop":
            _json_object(text)
            finished += 1
    assert finished >= NUM_REQUESTS // 2
    completion = oa.completions.create(model=model, prompt="{", max_tokens=MAX_TOKENS, temperature=1.0, seed=3,
                                       extra_body={"response_format": schema_format})
    jsonschema.validate(json.loads(completion.choices[0].text), PERSON)
    assert_idle(native)


def test_openai_forced_tool_calls(oa: openai.OpenAI, model: str, native: NativeClient) -> None:
    def ask(seed: int) -> openai.types.chat.ChatCompletion:
        choice = "required" if seed % 2 else {"type": "function", "function": {"name": "get_time"}}
        return oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather or time?"}],
                                          tools=WEATHER, tool_choice=choice, max_tokens=MAX_TOKENS,  # type: ignore
                                          temperature=1.0, seed=seed)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in WEATHER}
    for seed, response in enumerate(_each(ask)):
        assert_no_extra_fields(response)
        choice = response.choices[0]                                         # type: ignore[attr-defined]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.function.name in schemas and (seed % 2 or call.function.name == "get_time")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    chunks = list(oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "Time?"}],
                                             tools=WEATHER, tool_choice="required", max_tokens=MAX_TOKENS,  # type: ignore
                                             seed=5, stream=True))
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(calls) == 1 and calls[0][0].index == 0 and calls[0][0].id.startswith("call_")
    assert json.loads(calls[0][0].function.arguments) is not None
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert_idle(native)


@pytest.mark.parametrize("kind", ["json_schema", "regex", "ebnf", "json_object"])
def test_native_guides(native: NativeClient, kind: str) -> None:
    spec, check = CASES.get(kind, ("", _json_object))
    outputs = _each(lambda seed: collect(native.stream(f"Answer {seed}:", Sampling(
        max_tokens=MAX_TOKENS, temperature=1.0, seed=seed, guide=(kind, spec)))))
    finished = [o for o in outputs if o.finish_reason == "stop"]                # type: ignore[attr-defined]
    for output in finished:
        check(output.text)                                                      # type: ignore[attr-defined]
    assert len(finished) == NUM_REQUESTS or (kind == "json_object" and len(finished) >= NUM_REQUESTS // 2)
    assert_idle(native)


@pytest.mark.parametrize("kind", ["json_schema", "regex", "ebnf", "json_object"])
def test_triton_guides(server: ServerProcess, native: NativeClient, kind: str) -> None:
    spec, check = CASES.get(kind, ("", _json_object))

    def ask(seed: int) -> str:
        with TritonClient(server.target, timeout_s=120) as triton:
            return triton.generate(f"Answer {seed}:", Sampling(max_tokens=MAX_TOKENS, temperature=1.0, seed=seed,
                                                               top_k=0, guide=(kind, spec)))
    texts = _each(ask)
    checked = 0
    for text in texts:
        try:
            check(text)                                                          # type: ignore[arg-type]
            checked += 1
        except (json.JSONDecodeError, AssertionError):
            if kind != "json_object":                  # only unbounded strings may reach max_tokens
                raise
    assert checked >= NUM_REQUESTS // 2
    assert_idle(native)


def test_unenforceable_guides_are_refused(oa: openai.OpenAI, model: str, native: NativeClient,
                                          server: ServerProcess) -> None:
    bad_schema = {"type": "object", "properties": {"x": {"type": "string", "format": "credit-card"}}}
    with pytest.raises(openai.BadRequestError) as info:
        oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": bad_schema}})   # type: ignore[arg-type]
    assert info.value.body["param"] == "response_format.json_schema.schema"
    assert "format: credit-card" in info.value.body["message"]
    with pytest.raises(grpc.RpcError) as rpc:
        native.generate("x", Sampling(guide=("regex", "(unclosed")))
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc.value.details().startswith("sampling.guided_decoding.regex: ")
    with pytest.raises(grpc.RpcError) as rpc:
        native.generate("x", Sampling(ignore_eos=True, guide=("regex", "a+")))
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ignore_eos" in rpc.value.details()
    with TritonClient(server.target, timeout_s=60) as triton:
        with pytest.raises(RuntimeError, match="guided_decoding_guide: .*'oneOf'"):
            triton.generate("x", Sampling(guide=("json_schema", json.dumps({"oneOf": [{"type": "integer"}]}))))
    assert_idle(native)
