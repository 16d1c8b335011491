"""Tool-call text -> OpenAI tool_calls, without a server: the Qwen2.5 (hermes) and Llama 3 (JSON) formats,
whole and streamed in pieces of every size, and which format a chat template asks for."""
from __future__ import annotations

import json

import pytest

from builder.tokenizer import CHAT_TEMPLATE
from grpc_service.http.tool_calls import ToolCallStream, call_schema, parse_tool_calls, tool_format

HERMES = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
          '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
LLAMA = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; ' \
        '{"name": "get_time", "parameters": {"zone": "CET"}}'
EXPECTED = [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]


def _calls(calls: list) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_formats_from_templates() -> None:
    assert tool_format(CHAT_TEMPLATE) == "hermes"                   # the tiny presets' template
    llama_like = ("{% if tools %}<|start_header_id|>user<|end_header_id|>Given the following functions, respond "
                  "with a JSON for a function call ... {{ tools }}{% endif %}<|python_tag|>")
    assert tool_format(llama_like) == "llama3_json"
    assert tool_format("{% for m in messages %}{{ m.content }}{% endfor %}") is None


@pytest.mark.parametrize(("text", "fmt", "content"), [(HERMES, "hermes", "Let me check."),
                                                      (LLAMA, "llama3_json", None)])
def test_whole_reply(text: str, fmt: str, content: str | None) -> None:
    got_content, calls = parse_tool_calls(text, fmt)                 # type: ignore[arg-type]
    assert got_content == content and _calls(calls) == EXPECTED
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json"])
def test_text_that_is_not_a_call_stays_content(fmt: str) -> None:
    for text in ("Just words.", "<tool_call>\n{not json}\n</tool_call>", '{"no_name": 1}'):
        assert parse_tool_calls(text, fmt) == (text, [])             # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "fmt", "content"), [(HERMES, "hermes", "Let me check."),
                                                      (LLAMA, "llama3_json", "")])
@pytest.mark.parametrize("piece", [1, 2, 5, 1000])
def test_streamed_reply(text: str, fmt: str, content: str, piece: int) -> None:
    stream = ToolCallStream(fmt)                                    # type: ignore[arg-type]
    sent = "".join(stream.feed(text[i:i + piece]) for i in range(0, len(text), piece))
    rest, calls = stream.finish()
    assert sent + rest == content and _calls(calls) == EXPECTED
    assert "<tool" not in sent and "{" not in sent                   # the call itself never leaks as content


def test_streamed_plain_text_flows_through() -> None:
    for fmt in ("hermes", "llama3_json"):
        stream = ToolCallStream(fmt)                                # type: ignore[arg-type]
        text = "Plain answer with < and <tool but no call."
        sent = "".join(stream.feed(ch) for ch in text)
        rest, calls = stream.finish()
        assert sent + rest == text and calls == []


def test_call_schema_names_each_tool() -> None:
    tools = [{"name": "a", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}},
             {"name": "b"}]
    schema = call_schema("hermes", tools)
    assert [v["properties"]["name"] for v in schema["anyOf"]] == [{"const": "a"}, {"const": "b"}]
    assert call_schema("llama3_json", tools[:1])["required"] == ["name", "parameters"]
