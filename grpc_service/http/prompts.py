"""OpenAI requests -> prompt ids (with images / videos) and SamplingParams for one served engine.

What it is for: `chat_prompt` renders chat messages (text, `image_url` and
`video_url` parts, assistant `tool_calls`, `tool` results, and the request's
`tools`) through the engine's chat template, sending visual parts through the
same `VisualFrontend`, URL policy and limits as the gRPC APIs;
`completion_prompts` reads a completions `prompt` (text, texts, token ids or
lists of them); tokenizer work runs on the model's tokenizer thread (off_loop); `sampling_params` maps the shared fields onto the runtime's
`SamplingParams` (which judges every value once, at admission).
Not for: parsing the JSON body (schema.py) or structured output (structured.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from grpc_service.engine_host import ServedModel
from grpc_service.errors import InvalidArgument
from grpc_service.http.schema import ChatCompletionRequest, ChatMessage, CompletionRequest, _Sampling
from grpc_service.http.tool_calls import ToolFormat, tool_format
from grpc_service.visual_inputs import ChatContent, FieldNames, ImageSource, VideoSource
from runtime.multimodal.processor import MultimodalInputs
from runtime.sampling_params import GuidedDecoding, SamplingParams

MAX_PROMPTS = 64                  # completions: prompts in one request
ROLE_ALIASES = {"developer": "system"}


@dataclass(frozen=True, slots=True)
class Prompt:
    token_ids: list[int]
    multimodal: MultimodalInputs | None = None
    text: str | None = None       # the prompt as text, for completions' echo


@dataclass(frozen=True, slots=True)
class ChatTools:
    """The tools of a chat request as the template gets them, and how calls come back."""

    specs: list[dict[str, Any]]           # the functions: name, description, parameters
    template_tools: list[dict[str, Any]]  # as the chat template gets them: {"type": "function", "function": ...}
    format: ToolFormat
    parse: bool                   # tool_choice is not "none": parse calls out of the reply


async def chat_prompt(model: ServedModel, request: ChatCompletionRequest) -> tuple[Prompt, ChatTools | None]:
    tools = chat_tools(model, request)
    turns: list[tuple[str, ChatContent]] = []
    has_visuals = False
    for i, message in enumerate(request.messages):
        content = message_content(message, f"messages[{i}]")
        has_visuals = has_visuals or (isinstance(content, list) and any(not isinstance(p, str) for p in content))
        turns.append((ROLE_ALIASES.get(message.role, message.role), content))
    if has_visuals:
        if tools is not None or any(m.tool_calls for m in request.messages):
            raise InvalidArgument("tools", "tool use together with images or videos is not supported")
        first_visual = next(p for _, c in turns if isinstance(c, list) for p in c if not isinstance(p, str))
        ids, multimodal = await model.encode_visual_chat(turns, True, FieldNames({}), first_visual.field)
        return Prompt(ids, multimodal), None
    roles = [role for role, _ in turns]
    model.check_chat(roles, sum(len(_text(content)) for _, content in turns))
    messages = [_template_message(request.messages[i], role, _text(content), i)
                for i, (role, content) in enumerate(turns)]
    ids = await model.off_loop(model.render_chat, messages, True,
                               tools.template_tools if tools is not None else None, "messages")
    return Prompt(ids), tools


def chat_tools(model: ServedModel, request: ChatCompletionRequest) -> ChatTools | None:
    if not request.tools:
        return None
    fmt = tool_format(model.chat_template)
    if fmt is None:
        raise InvalidArgument("tools", f"the chat template of model {model.name!r} does not render tools")
    specs = [tool.function.model_dump(exclude_none=True) for tool in request.tools]
    names = [spec["name"] for spec in specs]
    if len(set(names)) != len(names):
        raise InvalidArgument("tools", "function names must be unique")
    choice = request.tool_choice
    if choice is not None and not isinstance(choice, str) and choice.function.name not in names:
        raise InvalidArgument("tool_choice.function.name", f"{choice.function.name!r} is not one of the tools")
    template_tools = [tool.model_dump(exclude_none=True) for tool in request.tools]
    return ChatTools(specs, template_tools, fmt, choice != "none")


def message_content(message: ChatMessage, field: str) -> ChatContent:
    """A message's content as text or a list of text / ImageSource / VideoSource parts."""
    content = message.content
    if content is None:
        if message.role != "assistant" or not message.tool_calls:
            raise InvalidArgument(f"{field}.content", "is required (only an assistant message with "
                                                      "tool_calls may omit it)")
        return ""
    if isinstance(content, str):
        return content
    parts: list[str | ImageSource | VideoSource] = []
    for j, part in enumerate(content):
        name = f"{field}.content[{j}]"
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidArgument(f"{name}.text", "must be a string")
            parts.append(text)
        elif kind in ("image_url", "video_url"):
            url = _part_url(part.get(kind), f"{name}.{kind}")
            parts.append(ImageSource(f"{name}.{kind}", url=url) if kind == "image_url"
                         else VideoSource(f"{name}.{kind}", url=url))
        else:
            raise InvalidArgument(f"{name}.type", f"must be 'text', 'image_url' or 'video_url', got {kind!r}")
    return parts


def _part_url(value: object, field: str) -> str:
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise InvalidArgument(f"{field}.url", "must be a string (a data:, file:// or http(s):// URL)")
    return url


def _text(content: ChatContent) -> str:
    return content if isinstance(content, str) else "".join(p for p in content if isinstance(p, str))


def _template_message(message: ChatMessage, role: str, text: str, index: int) -> dict[str, Any]:
    out: dict[str, Any] = {"role": role, "content": text}
    if message.tool_calls:
        calls = []
        for j, call in enumerate(message.tool_calls):
            try:
                arguments = json.loads(call.function.arguments)
            except json.JSONDecodeError:
                raise InvalidArgument(f"messages[{index}].tool_calls[{j}].function.arguments",
                                      "must be a JSON object") from None
            calls.append({"type": "function", "id": call.id,
                          "function": {"name": call.function.name, "arguments": arguments}})
        out["tool_calls"] = calls
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    return out


async def completion_prompts(model: ServedModel, request: CompletionRequest) -> list[Prompt]:
    raw = request.prompt
    if isinstance(raw, str):
        items: list[str | list[int]] = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [list(raw)]                                   # type: ignore[arg-type]
    else:
        items = list(raw)                                     # type: ignore[arg-type]
    if not items:
        raise InvalidArgument("prompt", "must not be empty")
    if len(items) > MAX_PROMPTS:
        raise InvalidArgument("prompt", f"{len(items)} prompts exceed the limit of {MAX_PROMPTS}")
    prompts = []
    for i, item in enumerate(items):
        field = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            if not item:
                raise InvalidArgument(field, "is empty")
            prompts.append(Prompt(await model.off_loop(model.encode_text, item), text=item))
        else:
            model.check_token_ids(item, field)
            prompts.append(Prompt(list(item)))
    return prompts


def sampling_params(request: _Sampling, model: ServedModel, prompt: Prompt, max_tokens: int | None,
                    logprobs: int | None, guided: GuidedDecoding | None) -> SamplingParams:
    """The shared fields; an absent max_tokens means as many as fit into max_seq_len."""
    if max_tokens is None:
        max_tokens = max(1, model.limits.max_seq_len - len(prompt.token_ids))
    values: dict[str, Any] = {"max_tokens": max_tokens, "logprobs": logprobs, "stop": request.stop_strings(),
                              "ignore_eos": request.ignore_eos, "guided_decoding": guided}
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "seed", "min_tokens"):
        value = getattr(request, name)
        if value is not None:
            values[name] = value
    return SamplingParams(**values)
