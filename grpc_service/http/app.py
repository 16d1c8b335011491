"""The OpenAI-compatible routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health.

What it is for: `create_app(...)`, a FastAPI app over the same `ModelRegistry`
(and so the same engines, admission gates, metrics, image policy and limits)
as the gRPC APIs. Each handler reads the body under the message-size limit
(413 beyond it), parses it (400 naming the field), builds prompts and
SamplingParams, and either answers one JSON body or streams server-sent
events. A streamed request answers with its error status (not 200) when the
engine refuses it before its first token. When the client disconnects, the
handler's generation is cancelled, which aborts every engine request of it
within one step and frees its KV blocks; non-streamed requests watch for the
disconnect while they wait.
While the server drains, every endpoint answers 503.
Not for: the wire format of bodies (responses.py, replies.py) or running uvicorn (serve.py).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from grpc_service.errors import InvalidArgument, Unavailable
from grpc_service.handlers import DRAINING_MESSAGE
from grpc_service.http import structured
from grpc_service.http.choices import Job, make_jobs, run_choices
from grpc_service.http.errors import BodyTooLarge, error_response, http_status
from grpc_service.http.prompts import chat_prompt, completion_prompts, sampling_params
from grpc_service.http.replies import (
    Reply,
    chat_reply,
    chat_stream,
    completion_reply,
    completion_stream,
)
from grpc_service.http.responses import model_list, new_id, now
from grpc_service.http.schema import ChatCompletionRequest, CompletionRequest, parse_body
from grpc_service.registry import ModelRegistry

CLIENT_CLOSED = 499          # nginx's status for "the client went away"; nobody reads it


class OpenAIApi:
    def __init__(self, registry: ModelRegistry, accepting: Callable[[], bool], max_body_bytes: int,
                 count_error: Callable[[str, str], None]) -> None:
        self.registry = registry
        self.accepting = accepting
        self.max_body_bytes = max_body_bytes
        self.count_error = count_error
        self.created = now()

    async def chat_completions(self, request: Request) -> Response:
        return await self._guarded(request, "chat.completions", self._chat)

    async def completions(self, request: Request) -> Response:
        return await self._guarded(request, "completions", self._completions)

    async def models(self, request: Request) -> Response:
        return await self._guarded(request, "models", self._models)

    async def health(self, request: Request) -> Response:
        if self.accepting() and self.registry.ready:
            return JSONResponse({"status": "ok"})
        return error_response(Unavailable(DRAINING_MESSAGE if not self.accepting() else "models are loading"))

    # ------------------------------------------------------------------ handlers

    async def _chat(self, request: Request) -> Response:
        body: ChatCompletionRequest = parse_body(await self._body(request), ChatCompletionRequest)
        model = self.registry.served_model(body.model)
        prompt, tools = await chat_prompt(model, body)
        guide = await structured.chat_guide(model, body, tools)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling_params(body, model, prompt, body.output_limit(), logprobs, guide)
        jobs = make_jobs([prompt], [params], body.n)
        reply = Reply(new_id("chatcmpl"), now(), model.name, model.tokenizer,
                      body.stream_options is not None and body.stream_options.include_usage)
        outputs = run_choices(model, jobs)
        if body.stream:
            return await _stream(request, outputs, lambda o: chat_stream(o, jobs, reply, body.logprobs, tools))
        return await _until_done(request, chat_reply(outputs, jobs, reply, body.logprobs, tools))

    async def _completions(self, request: Request) -> Response:
        body: CompletionRequest = parse_body(await self._body(request), CompletionRequest)
        model = self.registry.served_model(body.model)
        if body.echo and body.logprobs is not None:
            raise InvalidArgument("echo", "together with logprobs is not supported "
                                          "(prompt logprobs are not computed)")
        prompts = await completion_prompts(model, body)
        guide = await structured.completion_guide(model, body)
        params = [sampling_params(body, model, p, body.max_tokens, body.logprobs, guide) for p in prompts]
        jobs = make_jobs(prompts, params, body.n)
        echo_texts = {job.index: _prompt_text(model, job) for job in jobs} if body.echo else {}
        reply = Reply(new_id("cmpl"), now(), model.name, model.tokenizer,
                      body.stream_options is not None and body.stream_options.include_usage)
        want = body.logprobs is not None
        outputs = run_choices(model, jobs)
        if body.stream:
            return await _stream(request, outputs,
                                 lambda o: completion_stream(o, jobs, reply, want, body.echo, echo_texts))
        return await _until_done(request, completion_reply(outputs, jobs, reply, want, body.echo, echo_texts))

    async def _models(self, request: Request) -> Response:
        if self.registry.loading:
            raise Unavailable("the server is loading models; retry when /health answers 200")
        return JSONResponse(model_list([m.name for m in self.registry.served_models], self.created))

    # ------------------------------------------------------------------ plumbing

    async def _guarded(self, request: Request, name: str,
                       handler: Callable[[Request], Awaitable[Response]]) -> Response:
        try:
            if not self.accepting():
                raise Unavailable(DRAINING_MESSAGE)
            return await handler(request)
        except Exception as exc:
            status, _ = http_status(exc)
            self.count_error(f"openai.{name}", str(status))
            return error_response(exc)

    async def _body(self, request: Request) -> bytes:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            raise BodyTooLarge(self.max_body_bytes)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyTooLarge(self.max_body_bytes)
            chunks.append(chunk)
        return b"".join(chunks)


def _prompt_text(model: Any, job: Job) -> str:
    text = job.prompt.text
    return text if text is not None else model.decode(job.prompt.token_ids, field="prompt")


async def _stream(request: Request, outputs: AsyncIterator[Any],
                  render: Callable[[AsyncIterator[Any]], AsyncIterator[bytes]]) -> Response:
    """Wait for the first engine output (a refusal then still gets its own status), then stream events.
    Starlette cancels the body iterator when the client disconnects; closing it aborts the requests."""
    try:
        first = await anext(outputs)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await outputs.aclose()                  # type: ignore[attr-defined]
        raise

    async def replay() -> AsyncIterator[Any]:
        try:
            if first is not None:
                yield first
            async for item in outputs:
                yield item
        finally:
            await outputs.aclose()              # type: ignore[attr-defined]

    return StreamingResponse(render(replay()), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _until_done(request: Request, body: Awaitable[dict]) -> Response:
    """The whole body, unless the client disconnects first: then the generation is cancelled (aborted)."""
    work = asyncio.ensure_future(body)
    gone = asyncio.ensure_future(_disconnected(request))
    done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    if work in done:
        gone.cancel()
        return JSONResponse(work.result())
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    return Response(status_code=CLIENT_CLOSED)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(registry: ModelRegistry, accepting: Callable[[], bool], max_body_bytes: int,
               count_error: Callable[[str, str], None]) -> FastAPI:
    api = OpenAIApi(registry, accepting, max_body_bytes, count_error)
    app = FastAPI(title="trtserve OpenAI-compatible API", docs_url=None, redoc_url=None)
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/health", api.health, methods=["GET"])
    return app
