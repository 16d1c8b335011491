"""Tool calls: which text format a chat template asks the model to call tools in, and parsing it.

What it is for: the two formats of the supported chat templates,

* `hermes` (Qwen2.5 and the tiny presets): each call is
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, after optional text;
* `llama3_json` (Llama 3.1 / 3.2): the whole reply is `{"name": ..., "parameters": {...}}`
  (optionally after `<|python_tag|>`), several calls separated by `;`;

`tool_format(template)` picks one from the template text (None when the
template does not render `tools`), `parse_tool_calls` splits a finished reply
into content and calls, `ToolCallStream` does the same for a streamed reply
(text before a call streams at once, the call itself is held back and sent
whole when the reply ends), and `call_schema` gives the JSON schema one call
must follow (for `tool_choice: required` or a named function, which
structured output then enforces).
Not for: rendering the tools into the prompt (the chat template does that) or
enforcing the format (runtime.structured).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

ToolFormat = Literal["hermes", "llama3_json"]
HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class ParsedToolCall:
    name: str
    arguments: str                       # a JSON object, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def tool_format(template: str) -> ToolFormat | None:
    """The format a chat template's tool prompt asks for; None when it does not render tools."""
    if "tools" not in template:
        return None
    if HERMES_OPEN in template:
        return "hermes"
    if PYTHON_TAG in template or "<|start_header_id|>" in template:
        return "llama3_json"
    return "hermes"


def call_schema(tool_format_: ToolFormat, tools: list[dict[str, Any]]) -> dict[str, Any]:
    """JSON schema of one call to any of `tools` (function specs: name, parameters)."""
    arguments_key = "arguments" if tool_format_ == "hermes" else "parameters"
    variants = [{"type": "object",
                 "properties": {"name": {"const": tool["name"]},
                                arguments_key: tool.get("parameters") or {"type": "object"}},
                 "required": ["name", arguments_key], "additionalProperties": False}
                for tool in tools]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def call_affixes(tool_format_: ToolFormat) -> tuple[str, str]:
    """Literal text around one forced call's JSON."""
    return (HERMES_OPEN + "\n", "\n" + HERMES_CLOSE) if tool_format_ == "hermes" else ("", "")


def parse_tool_calls(text: str, tool_format_: ToolFormat) -> tuple[str | None, list[ParsedToolCall]]:
    """(content, calls) of a finished reply; a reply that does not parse as calls is all content."""
    if tool_format_ == "hermes":
        start = text.find(HERMES_OPEN)
        if start < 0:
            return text, []
        calls = [_call(body, "arguments") for body in _HERMES_CALL.findall(text[start:])]
        if not calls or any(c is None for c in calls):
            return text, []
        content = text[:start].strip()
        return (content or None), [c for c in calls if c is not None]
    stripped = text.strip()
    if stripped.startswith(PYTHON_TAG):
        stripped = stripped[len(PYTHON_TAG):].lstrip()
    if not stripped.startswith("{"):
        return text, []
    calls = []
    decoder = json.JSONDecoder()
    position = 0
    while position < len(stripped):
        try:
            value, end = decoder.raw_decode(stripped, position)
        except json.JSONDecodeError:
            return text, []
        call = _call_value(value, "parameters")
        if call is None:
            return text, []
        calls.append(call)
        position = end
        while position < len(stripped) and stripped[position] in " \t\r\n;":
            position += 1
    return None, calls


def _call(body: str, arguments_key: str) -> ParsedToolCall | None:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    return _call_value(value, arguments_key)


def _call_value(value: object, arguments_key: str) -> ParsedToolCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(arguments_key, value.get("arguments", value.get("parameters", {})))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


class ToolCallStream:
    """Splits a streamed reply: `feed(delta)` returns the content that can go out now; `finish()` returns
    the held-back rest as (content, calls)."""

    def __init__(self, tool_format_: ToolFormat) -> None:
        self.format = tool_format_
        self._held = ""            # text not yet sent
        self._in_call = False      # a call has started: hold everything until the end
        self._sent_any = False

    def feed(self, delta: str) -> str:
        self._held += delta
        if self._in_call:
            return ""
        if self.format == "llama3_json":
            if self._sent_any:
                return self._release(len(self._held))
            stripped = self._held.lstrip()
            if stripped.startswith(("{", PYTHON_TAG)):
                self._in_call = True
                return ""
            if not stripped or PYTHON_TAG.startswith(stripped):
                return ""
            return self._release(len(self._held))
        start = self._held.find(HERMES_OPEN)
        if start >= 0:
            self._in_call = True
            return self._release(start)
        return self._release(len(self._held) - _partial_suffix(self._held, HERMES_OPEN))

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        rest, self._held = self._held, ""
        if not self._in_call:
            return rest, []
        content, calls = parse_tool_calls(rest, self.format)
        if not calls:
            return rest, []
        return content or "", calls

    def _release(self, num_chars: int) -> str:
        out, self._held = self._held[:num_chars], self._held[num_chars:]
        self._sent_any = self._sent_any or bool(out)
        return out


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0
