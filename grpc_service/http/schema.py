"""Request bodies of the OpenAI-compatible endpoints, parsed and checked.

What it is for: pydantic models of `/v1/chat/completions` and `/v1/completions`
requests (the OpenAI fields this server honours, plus vLLM's `top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `ignore_eos` extensions), and
`parse_body(raw, model_cls)`, which turns JSON or shape errors into an
`InvalidArgument` naming the field as the client spelled it
(`messages[0].content[1].image_url.url`). Fields OpenAI defines that this
server cannot honour (`logit_bias`, `functions`, `suffix`, audio output) are
refused by name, never silently ignored; unknown extra fields are ignored as
OpenAI's own API does for forward compatibility.
Value ranges (temperature, top_p, ...) are judged once, by
`runtime.sampling_params.SamplingParams.validate`; content parts by prompts.py.
Not for: turning a request into prompt ids or sampling parameters (prompts.py).
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from grpc_service.errors import InvalidArgument

MAX_N = 16                        # parallel samples per request
MAX_STOP_STRINGS = 4              # as OpenAI
MAX_TOOLS = 64


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=False)


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ToolCallFunction(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str = ""
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class _Sampling(_Body):
    """Fields both endpoints share."""

    model: str = ""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    response_format: ResponseFormat | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidArgument("stop", f"{len(stop)} strings exceed the limit of {MAX_STOP_STRINGS}")
        return tuple(stop)

    def check_unsupported(self) -> None:
        if self.logit_bias:
            raise InvalidArgument("logit_bias", "is not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise InvalidArgument("stream_options", "is only allowed when stream is true")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    audio: dict[str, Any] | None = None

    def check_unsupported(self) -> None:
        _Sampling.check_unsupported(self)
        if self.functions is not None:
            raise InvalidArgument("functions", "is deprecated by OpenAI and not supported; use tools")
        if self.audio is not None:
            raise InvalidArgument("audio", "audio output is not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidArgument("top_logprobs", "needs logprobs set to true")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise InvalidArgument("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise InvalidArgument("tool_choice", "needs tools")

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = None

    def check_unsupported(self) -> None:
        _Sampling.check_unsupported(self)
        if self.suffix:
            raise InvalidArgument("suffix", "is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidArgument("best_of", "is not supported (only best_of equal to n)")


def parse_body(raw: bytes, model_cls: type[_Sampling]) -> Any:
    """JSON body -> `model_cls`, or InvalidArgument naming the first offending field."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument("body", f"is not valid JSON ({exc.__class__.__name__}: {str(exc)[:120]})") from None
    if not isinstance(data, dict):
        raise InvalidArgument("body", "must be a JSON object")
    try:
        parsed = model_cls.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        raise InvalidArgument(field_path(error["loc"]) or "body", str(error["msg"])[:300]) from None
    parsed.check_unsupported()
    return parsed


def field_path(loc: tuple[int | str, ...]) -> str:
    """pydantic's error location as the client spells the field: messages[0].content (type labels of
    union members, such as 'str' or 'list[int]', are dropped)."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier() and part not in _TYPE_LABELS and not part[0].isupper():
            path += f".{part}" if path else part
    return path


_TYPE_LABELS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "literal"})
