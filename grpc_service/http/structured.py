"""Structured output from OpenAI fields: `response_format` and forced tool calls -> a checked GuidedDecoding.

What it is for: `chat_guide` (`response_format` json_object / json_schema with
or without `strict`, or `tool_choice` "required" / a named function, which
forces one call in the template's tool-call format) and `completion_guide`
(`response_format`, as vLLM accepts it on completions). The guide is
compiled before admission, off the event loop (ServedModel.prepare_guide), so
the engine step only finds it in the cache; a schema or construct that cannot
be enforced is a 400 naming the field.
Not for: compiling or enforcing grammars (runtime.structured).
"""
from __future__ import annotations

import json

from grpc_service.engine_host import ServedModel
from grpc_service.errors import InvalidArgument
from grpc_service.http.prompts import ChatTools
from grpc_service.http.schema import ChatCompletionRequest, CompletionRequest, ResponseFormat
from grpc_service.http.tool_calls import call_affixes, call_schema
from runtime.sampling_params import GuidedDecoding

__all__ = ["InvalidArgument", "chat_guide", "completion_guide"]


async def chat_guide(model: ServedModel, body: ChatCompletionRequest,
                     tools: ChatTools | None) -> GuidedDecoding | None:
    choice = body.tool_choice
    if tools is not None and choice is not None and choice not in ("auto", "none"):
        if body.response_format is not None and body.response_format.type != "text":
            raise InvalidArgument("response_format", "cannot be combined with a forced tool call (tool_choice)")
        specs = tools.specs if choice == "required" else \
            [s for s in tools.specs if s["name"] == choice.function.name]   # type: ignore[union-attr]
        prefix, suffix = call_affixes(tools.format)
        guide = GuidedDecoding("json_schema", json.dumps(call_schema(tools.format, specs)), prefix, suffix)
        await model.prepare_guide(guide, "tools")
        return guide
    return await _response_format(model, body.response_format)


async def completion_guide(model: ServedModel, body: CompletionRequest) -> GuidedDecoding | None:
    return await _response_format(model, body.response_format)


async def _response_format(model: ServedModel, response_format: ResponseFormat | None) -> GuidedDecoding | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        guide = GuidedDecoding("json_object")
        await model.prepare_guide(guide, "response_format")
        return guide
    spec = response_format.json_schema
    if spec is None or spec.schema_ is None:
        raise InvalidArgument("response_format.json_schema.schema", "is required for type 'json_schema'")
    guide = GuidedDecoding("json_schema", json.dumps(spec.schema_))
    await model.prepare_guide(guide, "response_format.json_schema.schema")
    return guide
