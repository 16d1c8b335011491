"""The native API, `trtserve.v1.LLMService`: Generate (server streaming), Tokenize, Detokenize, ListModels,
ModelInfo.

What it is for: turning native messages into prompt ids and `SamplingParams`
and `RequestOutput` deltas back into `GenerateResponse`s. A client deadline
ends the request with DEADLINE_EXCEEDED; a cancelled or vanished client
cancels this coroutine, and leaving the stream aborts the engine request.
Not for: status codes (errors.py via handlers.py) or admission (engine_host).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc

from grpc_service.engine_host import ServedModel
from grpc_service.errors import DeadlineExceeded, InvalidArgument, RequestFailed
from grpc_service.proto import trtserve_pb2 as pb
from grpc_service.registry import ModelRegistry
from runtime.outputs import RequestOutput
from runtime.sampling_params import SamplingParams

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
        if request.images or request.videos:
            raise InvalidArgument("images" if request.images else "videos",
                                  f"model {model.name!r} is text-only; it accepts no images or videos")
        prompt_ids = prompt_token_ids(request, model)
        params = sampling_params(request.sampling, model)
        salt = request.cache_salt if request.HasField("cache_salt") else None
        stream = model.generate(prompt_ids, params, API_LABEL, cache_salt=salt)
        remaining = context.time_remaining()
        loop = asyncio.get_running_loop()
        deadline = None if remaining is None else loop.time() + remaining
        async with contextlib.aclosing(stream) as outputs:
            while True:
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    out = await asyncio.wait_for(anext(outputs), timeout)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:       # TimeoutError on 3.11+, its own class on 3.10
                    raise DeadlineExceeded() from None
                if out.finish_reason == "error":
                    raise RequestFailed(out.error or "the engine failed the request")
                if out.text or out.token_ids or out.finished:
                    yield generate_response(request.request_id, out)

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        model = self.registry.served_model(request.model)
        if request.WhichOneof("input") == "chat":
            ids = model.encode_chat(chat_messages(request.chat), _add_generation_prompt(request.chat))
        else:
            ids = model.encode_text(request.text, add_special_tokens=request.add_special_tokens)
        return pb.TokenizeResponse(token_ids=ids, num_tokens=len(ids), max_input_len=model.limits.max_input_len)

    async def Detokenize(self, request: pb.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> pb.DetokenizeResponse:
        model = self.registry.served_model(request.model)
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        return pb.DetokenizeResponse(text=model.decode(list(request.token_ids), skip))

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


def prompt_token_ids(request: pb.GenerateRequest, model: ServedModel) -> list[int]:
    kind = request.WhichOneof("prompt")
    if kind == "text":
        return model.encode_text(request.text)
    if kind == "token_ids":
        ids = list(request.token_ids.ids)
        model.check_token_ids(ids, "token_ids")
        return ids
    if kind == "chat":
        return model.encode_chat(chat_messages(request.chat), _add_generation_prompt(request.chat))
    raise InvalidArgument("prompt", "set one of text, token_ids or chat")


def chat_messages(chat: pb.ChatMessages) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in chat.messages]


def _add_generation_prompt(chat: pb.ChatMessages) -> bool:
    return chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True


def sampling_params(sampling: pb.SamplingParameters, model: ServedModel) -> SamplingParams:
    """Set fields override the runtime defaults; validation (names + limits) happens at admission."""
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
        values["bad_words_ids"] = model.tokenize_words(list(sampling.bad_words))
    return SamplingParams(**values)  # type: ignore[arg-type]


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
    return pb.ModelCard(name=model.name, ready=model.ready, vocab_size=limits.vocab_size,
                        max_batch_size=limits.max_batch_size, max_input_len=limits.max_input_len,
                        max_seq_len=limits.max_seq_len, tokens_per_block=limits.tokens_per_block,
                        has_chat_template=model.has_chat_template, supports_images=False,
                        eos_token_ids=list(limits.eos_token_ids))
