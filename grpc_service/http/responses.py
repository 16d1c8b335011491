"""Response bodies of the OpenAI-compatible endpoints, with exactly the fields of OpenAI's published types.

What it is for: the JSON of chat completions and their stream chunks,
completions, usage (with `prompt_tokens_details.cached_tokens`), logprobs in
both endpoints' shapes, tool calls, the model list and errors. The `openai`
package's models parse every body built here with no extra fields left over
(the tests check that).
Not for: deciding what to answer (app.py) or status codes (errors.py).
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from grpc_service.http.tool_calls import ParsedToolCall
from runtime.executor.sampler import TokenLogprobs

Json = dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage_json(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Json:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def token_text(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id], skip_special_tokens=False))


def chat_logprobs(tokenizer: Any, logprobs: Sequence[TokenLogprobs]) -> Json:
    def entry(token_id: int, logprob: float) -> Json:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob),
                         "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs],
            "refusal": None}


def completion_logprobs(tokenizer: Any, logprobs: Sequence[TokenLogprobs], text_offset: int) -> Json:
    tokens, offsets, top = [], [], []
    for lp in logprobs:
        text = token_text(tokenizer, lp.token_id)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        top.append({token_text(tokenizer, t): v for t, v in lp.top})
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs], "top_logprobs": top,
            "text_offset": offsets}


def tool_call_json(call: ParsedToolCall, index: int | None = None) -> Json:
    out: Json = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    if index is not None:
        out["index"] = index
    return out


def chat_completion(response_id: str, created: int, model: str, choices: list[Json], usage: Json) -> Json:
    return {"id": response_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage}


def chat_choice(index: int, content: str | None, calls: Sequence[ParsedToolCall], finish_reason: str,
                logprobs: Json | None) -> Json:
    message: Json = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [tool_call_json(call) for call in calls]
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_chunk(response_id: str, created: int, model: str, choices: list[Json], usage: Json | None,
               include_usage: bool) -> Json:
    chunk: Json = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": choices}
    if include_usage:
        chunk["usage"] = usage
    return chunk


def chunk_choice(index: int, delta: Json, finish_reason: str | None = None, logprobs: Json | None = None) -> Json:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def completion(response_id: str, created: int, model: str, choices: list[Json], usage: Json | None) -> Json:
    body: Json = {"id": response_id, "object": "text_completion", "created": created, "model": model,
                  "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: Json | None) -> Json:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def model_list(names: Sequence[str], created: int) -> Json:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "trtserve"}
                                       for name in names]}


def error_body(message: str, error_type: str, param: str | None, code: str | None) -> Json:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def sse(data: Json | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode("utf-8")
