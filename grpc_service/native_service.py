"""The native API, `trtserve.v1.LLMService`: Generate (server streaming), Tokenize, Detokenize, ListModels,
ModelInfo.

What it is for: turning native messages into prompt ids and `SamplingParams`
and `RequestOutput` deltas back into `GenerateResponse`s. A client deadline
ends the request with DEADLINE_EXCEEDED; a cancelled or vanished client
cancels this coroutine, and leaving the stream aborts the engine request.
Images and videos (vision-language engines) come as chat message parts or,
with a text prompt, as `images` / `videos`; they become `ImageSource` /
`VideoSource`s named by their field path (`chat.messages[0].parts[1].image`,
`images[0]`) for engine_host's visual path.
Not for: status codes (errors.py via handlers.py) or admission (engine_host).
"""
from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc

from grpc_service.engine_host import MAX_CHAT_MESSAGES, MAX_CHAT_PARTS, ServedModel, check_words
from grpc_service.errors import DeadlineExceeded, InvalidArgument, RequestFailed
from grpc_service.guides import with_native_guide
from grpc_service.proto import trtserve_pb2 as pb
from grpc_service.registry import ModelRegistry
from grpc_service.visual_inputs import ChatContent, FieldNames, ImageSource, VideoSource
from runtime.multimodal.processor import MultimodalInputs
from runtime.outputs import RequestOutput
from runtime.sampling_params import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
    check_list_size,
)

API_LABEL = "native"
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
_INT_FIELDS = ("max_tokens", "top_k", "seed", "min_tokens", "logprobs")


class NativeService:
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def methods(self) -> Mapping[str, Callable[..., Any]]:
        return {"Generate": self.Generate, "Tokenize": self.Tokenize, "Detokenize": self.Detokenize,
                "ListModels": self.ListModels, "ModelInfo": self.ModelInfo}

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        model = self.registry.served_model(request.model)
        params = await sampling_params(request.sampling, model)
        prompt_ids, multimodal = await prompt_inputs(request, model)
        params = await with_native_guide(params, request.sampling, model)
        salt = request.cache_salt if request.HasField("cache_salt") else None
        stream = model.generate(prompt_ids, params, API_LABEL, cache_salt=salt, multimodal=multimodal)
        remaining = context.time_remaining()
        loop = asyncio.get_running_loop()
        deadline = None if remaining is None else loop.time() + remaining
        async with contextlib.aclosing(stream) as outputs:
            if deadline is None:        # no timer to arm: no wait_for (a coroutine per streamed token)
                async for out in outputs:
                    response = _response(request.request_id, out)
                    if response is not None:
                        yield response
                return
            while True:
                try:
                    out = await asyncio.wait_for(anext(outputs), max(0.0, deadline - loop.time()))
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:       # TimeoutError on 3.11+, its own class on 3.10
                    raise DeadlineExceeded() from None
                response = _response(request.request_id, out)
                if response is not None:
                    yield response

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        model = self.registry.served_model(request.model)
        if request.WhichOneof("input") == "chat":
            turns, names = chat_turns(request.chat)
            if names is not None:
                ids, _ = await model.encode_visual_chat(turns, _add_generation_prompt(request.chat), names,
                                                        "chat.messages")
            else:
                ids = await model.off_loop(model.encode_chat, _text_turns(turns), _add_generation_prompt(request.chat))
        else:
            ids = await model.off_loop(model.encode_text, request.text, request.add_special_tokens)
        return pb.TokenizeResponse(token_ids=ids, num_tokens=len(ids), max_input_len=model.limits.max_input_len)

    async def Detokenize(self, request: pb.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> pb.DetokenizeResponse:
        model = self.registry.served_model(request.model)
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        return pb.DetokenizeResponse(text=await model.off_loop(model.decode, request.token_ids, skip))

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_card(m) for m in self.registry.served_models])

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        model = self.registry.served_model(request.model)
        stats = await model.stats()
        kv = stats.kv
        status = pb.EngineStatus(
            num_running=stats.num_running, num_waiting=stats.num_waiting, num_in_flight=model.gate.in_flight,
            max_in_flight=model.gate.limit, kv_total_blocks=kv.total_num_blocks, kv_free_blocks=kv.num_free_blocks,
            kv_used_blocks=kv.num_used_blocks, kv_cached_blocks=kv.num_cached_blocks,
            prefix_cache_hit_rate=kv.hit_rate, num_steps=stats.num_steps,
            num_generated_tokens=stats.num_generated_tokens, num_preemptions=stats.num_preemptions)
        return pb.ModelInfoResponse(model=model_card(model), status=status)


async def prompt_inputs(request: pb.GenerateRequest,
                        model: ServedModel) -> tuple[list[int], MultimodalInputs | None]:
    """Prompt ids, plus the images / videos they hold (None for a text-only prompt)."""
    kind = request.WhichOneof("prompt")
    visual_field = "images" if request.images else "videos"
    num_visuals = len(request.images) + len(request.videos)     # judged before any source is built
    if num_visuals:
        if model.visual is None:
            raise InvalidArgument(visual_field, f"model {model.name!r} is text-only; it accepts no images or videos")
        if num_visuals > model.visual.limits.max_images_per_request:
            raise InvalidArgument(visual_field, f"{num_visuals} images and videos exceed the limit of "
                                                f"{model.visual.limits.max_images_per_request} per request")
    images = [image_source(image, f"images[{i}]") for i, image in enumerate(request.images)]
    videos = [video_source(video, f"videos[{i}]") for i, video in enumerate(request.videos)]
    if kind == "chat":
        turns, names = chat_turns(request.chat)
        if images or videos:
            raise InvalidArgument(visual_field, "with a chat prompt, put images and videos into the messages' parts")
        if names is not None:
            return await model.encode_visual_chat(turns, _add_generation_prompt(request.chat), names,
                                                  "chat.messages")
        return await model.off_loop(model.encode_chat, _text_turns(turns), _add_generation_prompt(request.chat)), None
    if images or videos:
        if kind != "text":
            raise InvalidArgument(visual_field, "need a text or chat prompt (token ids cannot carry images)")
        return await model.encode_visual_text(request.text, images, videos, FieldNames({}), visual_field)
    if kind == "text":
        return await model.off_loop(model.encode_text, request.text), None
    if kind == "token_ids":
        if len(request.token_ids.ids) > model.limits.max_input_len:     # before copying millions of ids
            raise InvalidArgument("token_ids", f"prompt ({len(request.token_ids.ids)} tokens) exceeds max_input_len "
                                               f"({model.limits.max_input_len})")
        return list(request.token_ids.ids), None
    raise InvalidArgument("prompt", "set one of text, token_ids or chat")


def chat_turns(chat: pb.ChatMessages) -> tuple[list[tuple[str, ChatContent]], FieldNames | None]:
    """(role, content) per message, content being text or a list of parts; FieldNames (runtime field ->
    this API's) when some message holds an image or video, else None."""
    if len(chat.messages) > MAX_CHAT_MESSAGES:
        raise InvalidArgument("chat.messages", f"{len(chat.messages)} messages exceed the limit of {MAX_CHAT_MESSAGES}")
    num_parts = sum(len(message.parts) for message in chat.messages)
    if num_parts > MAX_CHAT_PARTS:
        raise InvalidArgument("chat.messages", f"{num_parts} content parts exceed the limit of {MAX_CHAT_PARTS}")
    turns: list[tuple[str, ChatContent]] = []
    aliases = {"messages": "chat.messages"}
    has_visuals = False
    for i, message in enumerate(chat.messages):
        if not message.parts:
            turns.append((message.role, message.content))
            continue
        if message.content:
            raise InvalidArgument(f"chat.messages[{i}]", "set content or parts, not both")
        parts: list[str | ImageSource | VideoSource] = []
        for j, part in enumerate(message.parts):
            field = f"chat.messages[{i}].parts[{j}]"
            aliases[f"messages[{i}].content[{j}]"] = field
            which = part.WhichOneof("part")
            if which == "text":
                parts.append(part.text)
            elif which == "image":
                parts.append(image_source(part.image, f"{field}.image"))
            elif which == "video":
                parts.append(video_source(part.video, f"{field}.video"))
            else:
                raise InvalidArgument(field, "set one of text, image or video")
            has_visuals = has_visuals or which != "text"
        aliases[f"messages[{i}].content"] = f"chat.messages[{i}].parts"
        turns.append((message.role, parts))
    return turns, (FieldNames(aliases) if has_visuals else None)


def _text_turns(turns: list[tuple[str, ChatContent]]) -> list[tuple[str, str]]:
    """Messages without images: text parts joined as chat templates join them."""
    return [(role, content if isinstance(content, str) else "".join(p for p in content if isinstance(p, str)))
            for role, content in turns]


def image_source(image: pb.Image, field: str) -> ImageSource:
    which = image.WhichOneof("source")
    if which == "data":
        return ImageSource(field, data=image.data)
    if which == "url":
        return ImageSource(field, url=image.url)
    raise InvalidArgument(field, "set data or url")


def video_source(video: pb.Video, field: str) -> VideoSource:
    fps = video.fps if video.HasField("fps") else None
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise InvalidArgument(f"{field}.fps", f"must be a finite number > 0, got {fps}")
    which = video.WhichOneof("source")
    if which == "data":
        return VideoSource(field, data=video.data, fps=fps)
    if which == "url":
        return VideoSource(field, url=video.url, fps=fps)
    if which == "frames":
        if not video.frames.frames:
            raise InvalidArgument(f"{field}.frames", "must hold at least 1 frame")
        return VideoSource(field, frames=tuple(video.frames.frames), fps=fps)
    raise InvalidArgument(field, "set data, url or frames")


def _add_generation_prompt(chat: pb.ChatMessages) -> bool:
    return chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True


async def sampling_params(sampling: pb.SamplingParameters, model: ServedModel) -> SamplingParams:
    """Set fields override the runtime defaults; validation (names + limits) happens at admission. The list
    fields are bounded here first (count before content), and bad words are tokenized off the event loop."""
    check_list_size("stop", sampling.stop, MAX_STOP_STRINGS, MAX_STOP_CHARS, "characters")
    check_list_size("stop_token_ids", sampling.stop_token_ids, MAX_STOP_TOKEN_IDS)
    check_words("bad_words", sampling.bad_words)
    values: dict[str, object] = {}
    for name in _FLOAT_FIELDS + _INT_FIELDS:
        if sampling.HasField(name):
            values[name] = getattr(sampling, name)
    if sampling.HasField("skip_special_tokens"):
        values["skip_special_tokens"] = sampling.skip_special_tokens
    values["ignore_eos"] = sampling.ignore_eos
    values["stop_token_ids"] = tuple(sampling.stop_token_ids)
    values["stop"] = tuple(sampling.stop)
    if sampling.bad_words:
        if any(not w for w in sampling.bad_words):
            raise InvalidArgument("bad_words", "entries must be non-empty strings")
        values["bad_words_ids"] = await model.off_loop(model.tokenize_words, list(sampling.bad_words))
    return SamplingParams(**values)  # type: ignore[arg-type]


def _response(request_id: str, out: RequestOutput) -> pb.GenerateResponse | None:
    """The message for one delta (None: nothing to send); a failed request raises RequestFailed."""
    if out.finish_reason == "error":
        raise RequestFailed(out.error or "the engine failed the request")
    if out.text or out.token_ids or out.finished:
        return generate_response(request_id, out)
    return None


def generate_response(request_id: str, out: RequestOutput) -> pb.GenerateResponse:
    response = pb.GenerateResponse(request_id=request_id, text=out.text, token_ids=out.token_ids,
                                   finished=out.finished)
    for lp in out.logprobs:
        entry = response.logprobs.add(token_id=lp.token_id, logprob=lp.logprob)
        for token_id, logprob in lp.top:
            entry.top.add(token_id=token_id, logprob=logprob)
    if out.finished:
        response.finish_reason = out.finish_reason or ""
        response.stop_reason = "" if out.stop_reason is None else str(out.stop_reason)
        usage = out.usage
        response.usage.CopyFrom(pb.Usage(
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens, time_to_first_token_s=usage.time_to_first_token_s or 0.0,
            num_preemptions=usage.num_preemptions))
    return response


def model_card(model: ServedModel) -> pb.ModelCard:
    limits = model.limits
    card = pb.ModelCard(name=model.name, ready=model.ready, vocab_size=limits.vocab_size,
                        max_batch_size=limits.max_batch_size, max_input_len=limits.max_input_len,
                        max_seq_len=limits.max_seq_len, tokens_per_block=limits.tokens_per_block,
                        has_chat_template=model.has_chat_template, supports_images=model.supports_images,
                        eos_token_ids=list(limits.eos_token_ids), tokenizer_vocab_size=model.tokenizer_vocab_size)
    if model.visual is not None:
        image_limits = model.visual.limits
        card.max_images_per_request = image_limits.max_images_per_request
        card.max_image_pixels = image_limits.max_image_pixels
        card.max_image_bytes = image_limits.max_image_bytes
    return card
