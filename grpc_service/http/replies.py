"""Turning the merged engine outputs of one request into chat / completion bodies or SSE streams.

What it is for: `chat_reply` / `chat_stream` and `completion_reply` /
`completion_stream`, given the `(choice, RequestOutput)` stream of
choices.run_choices: text, logprobs, finish reasons, tool calls (parsed from
the reply, or held back and sent whole while streaming), usage (each prompt
counted once, its cached tokens from its first sample, completion tokens of
every choice), and the final `[DONE]`. An error after the stream has started
is sent as one `{"error": ...}` event before `[DONE]`.
Not for: admission, prompts or routing (app.py, prompts.py).
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from grpc_service.http.choices import Job
from grpc_service.http.errors import error_json
from grpc_service.http.prompts import ChatTools
from grpc_service.http.responses import (
    Json,
    chat_choice,
    chat_chunk,
    chat_completion,
    chat_logprobs,
    chunk_choice,
    completion,
    completion_choice,
    completion_logprobs,
    sse,
    tool_call_json,
    usage_json,
)
from grpc_service.http.tool_calls import ParsedToolCall, ToolCallStream, parse_tool_calls
from runtime.executor.sampler import TokenLogprobs
from runtime.outputs import RequestOutput

Outputs = AsyncIterator[tuple[int, RequestOutput]]
DONE = sse("[DONE]")


@dataclass(frozen=True, slots=True)
class Reply:
    """What every body of one response shares."""

    response_id: str
    created: int
    model: str
    tokenizer: Any
    include_usage: bool = False


@dataclass(slots=True)
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None


class UsageCounter:
    """Each prompt counted once (from its first sample), completion tokens of every choice."""

    def __init__(self, jobs: list[Job]) -> None:
        self._leaders = {job.index for job in jobs if job.leader is None}
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0

    def add(self, index: int, out: RequestOutput) -> None:
        if not out.finished:
            return
        self.completion_tokens += out.usage.completion_tokens
        if index in self._leaders:
            self.prompt_tokens += out.usage.prompt_tokens
            self.cached_tokens += out.usage.cached_tokens

    def json(self) -> Json:
        return usage_json(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


def _finish_reason(out: RequestOutput) -> str:
    return "length" if out.finish_reason == "length" else "stop"


async def _collect(outputs: Outputs, jobs: list[Job]) -> tuple[dict[int, _Choice], UsageCounter]:
    choices = {job.index: _Choice() for job in jobs}
    usage = UsageCounter(jobs)
    async for index, out in outputs:
        choice = choices[index]
        choice.text.append(out.text)
        choice.logprobs.extend(out.logprobs)
        usage.add(index, out)
        if out.finished:
            choice.finish_reason = _finish_reason(out)
    return choices, usage


async def chat_reply(outputs: Outputs, jobs: list[Job], reply: Reply, want_logprobs: bool,
                     tools: ChatTools | None) -> Json:
    choices, usage = await _collect(outputs, jobs)
    body = []
    for index, choice in sorted(choices.items()):
        text: str | None = "".join(choice.text)
        calls: list[ParsedToolCall] = []
        if tools is not None and tools.parse:
            text, calls = parse_tool_calls(text or "", tools.format)
        reason = "tool_calls" if calls else (choice.finish_reason or "stop")
        logprobs = chat_logprobs(reply.tokenizer, choice.logprobs) if want_logprobs else None
        body.append(chat_choice(index, text, calls, reason, logprobs))
    return chat_completion(reply.response_id, reply.created, reply.model, body, usage.json())


async def chat_stream(outputs: Outputs, jobs: list[Job], reply: Reply, want_logprobs: bool,
                      tools: ChatTools | None) -> AsyncIterator[bytes]:
    usage = UsageCounter(jobs)
    splitters = {job.index: ToolCallStream(tools.format) for job in jobs} if tools is not None and tools.parse \
        else {}

    def chunk(choices: list[Json], usage_body: Json | None = None) -> bytes:
        return sse(chat_chunk(reply.response_id, reply.created, reply.model, choices, usage_body,
                              reply.include_usage))

    try:
        for job in jobs:
            yield chunk([chunk_choice(job.index, {"role": "assistant", "content": ""})])
        async for index, out in outputs:
            usage.add(index, out)
            splitter = splitters.get(index)
            text = splitter.feed(out.text) if splitter is not None else out.text
            logprobs = chat_logprobs(reply.tokenizer, out.logprobs) if want_logprobs and out.logprobs else None
            if text or logprobs is not None:
                yield chunk([chunk_choice(index, {"content": text}, logprobs=logprobs)])
            if not out.finished:
                continue
            reason = _finish_reason(out)
            if splitter is not None:
                rest, calls = splitter.finish()
                if rest:
                    yield chunk([chunk_choice(index, {"content": rest})])
                if calls:
                    reason = "tool_calls"
                    yield chunk([chunk_choice(index, {"tool_calls": [tool_call_json(c, k)
                                                                     for k, c in enumerate(calls)]})])
            yield chunk([chunk_choice(index, {}, reason)])
        if reply.include_usage:
            yield chunk([], usage.json())
    except Exception as exc:
        yield sse(error_json(exc)[1])
    yield DONE


async def completion_reply(outputs: Outputs, jobs: list[Job], reply: Reply, want_logprobs: bool,
                           echo: bool, echo_texts: dict[int, str]) -> Json:
    choices, usage = await _collect(outputs, jobs)
    body = []
    for index, choice in sorted(choices.items()):
        prefix = echo_texts.get(index, "") if echo else ""
        logprobs = completion_logprobs(reply.tokenizer, choice.logprobs, len(prefix)) if want_logprobs else None
        body.append(completion_choice(index, prefix + "".join(choice.text), choice.finish_reason or "stop",
                                      logprobs))
    return completion(reply.response_id, reply.created, reply.model, body, usage.json())


async def completion_stream(outputs: Outputs, jobs: list[Job], reply: Reply, want_logprobs: bool,
                            echo: bool, echo_texts: dict[int, str]) -> AsyncIterator[bytes]:
    usage = UsageCounter(jobs)
    offsets = {job.index: 0 for job in jobs}

    def chunk(choices: list[Json], usage_body: Json | None = None) -> bytes:
        return sse(completion(reply.response_id, reply.created, reply.model, choices, usage_body))

    try:
        if echo:
            for job in jobs:
                offsets[job.index] = len(echo_texts.get(job.index, ""))
                yield chunk([completion_choice(job.index, echo_texts.get(job.index, ""), None, None)])
        async for index, out in outputs:
            usage.add(index, out)
            logprobs = None
            if want_logprobs and out.logprobs:
                logprobs = completion_logprobs(reply.tokenizer, out.logprobs, offsets[index])
            offsets[index] += len(out.text)
            if out.text or logprobs is not None or out.finished:
                reason = _finish_reason(out) if out.finished else None
                yield chunk([completion_choice(index, out.text, reason, logprobs)])
        if reply.include_usage:
            yield chunk([], usage.json())
    except Exception as exc:
        yield sse(error_json(exc)[1])
    yield DONE
