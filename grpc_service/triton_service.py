"""KServe v2 `inference.GRPCInferenceService`, as Triton's TensorRT-LLM backend speaks it.

What it is for: the RPCs tritonclient calls (ServerLive/Ready/Metadata,
ModelReady/Metadata/Config/Statistics, ModelInfer, ModelStreamInfer) over the
tritonclient-shipped stubs. ModelInfer on a decoupled model is refused as
Triton refuses it (UNIMPLEMENTED). ModelStreamInfer multiplexes requests on
one stream: each runs as its own task, responses carry the request `id` and
`triton_final_response`; a request with the same `id` and `stop` = true
cancels the first (which then ends with a final response); a request's error
comes back as the stream response's `error_message`, and the stream goes on.
Closing or cancelling the stream aborts every request still running on it.
Not for: tensor decoding or generation (triton_models and below).
"""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from tritonclient.grpc import service_pb2 as pb

from grpc_service.errors import InvalidArgument, ServiceError, Unavailable, Unsupported, status_for
from grpc_service.handlers import DRAINING_MESSAGE, MalformedMessage
from grpc_service.registry import ModelRegistry
from grpc_service.triton_models import TritonModel
from grpc_service.triton_params import scalar_bool
from grpc_service.triton_stats import RequestClock, model_metadata, server_metadata
from grpc_service.triton_tensors import decode_inputs, encode_response

DECOUPLED_UNARY_MESSAGE = "ModelInfer RPC doesn't support models with decoupled transaction policy"
EMPTY_FINAL = "triton_enable_empty_final_response"
_END = object()


class TritonService:
    def __init__(self, registry: ModelRegistry, accepting: Callable[[], bool]) -> None:
        self.registry = registry
        self.accepting = accepting

    def methods(self) -> Mapping[str, Callable[..., Any]]:
        return {"ServerLive": self.ServerLive, "ServerReady": self.ServerReady,
                "ServerMetadata": self.ServerMetadata, "ModelReady": self.ModelReady,
                "ModelMetadata": self.ModelMetadata, "ModelConfig": self.ModelConfig,
                "ModelStatistics": self.ModelStatistics, "ModelInfer": self.ModelInfer,
                "ModelStreamInfer": self.ModelStreamInfer, "RepositoryIndex": self.RepositoryIndex}

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.registry.ready and self.accepting())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return server_metadata()

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        model = self.registry.triton_model(request.name, request.version, must_be_ready=False)
        return pb.ModelReadyResponse(ready=model.ready and self.accepting())

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        return model_metadata(self.registry.triton_model(request.name, request.version, must_be_ready=False).config)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        model = self.registry.triton_model(request.name, request.version, must_be_ready=False)
        return pb.ModelConfigResponse(config=model.config)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest,
                              context: Any) -> pb.ModelStatisticsResponse:
        if request.name:
            models = [self.registry.triton_model(request.name, request.version, must_be_ready=False)]
        else:
            models = self.registry.triton_models
        return pb.ModelStatisticsResponse(model_stats=[m.stats.to_proto(m.name) for m in models])

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: Any) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for model in self.registry.triton_models:
            if model.ready or not request.ready:
                state = "READY" if model.ready else "UNAVAILABLE"
                response.models.add(name=model.name, version="1", state=state)
        return response

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        model = self.registry.triton_model(request.model_name, request.model_version)
        if model.decoupled:
            raise Unsupported(DECOUPLED_UNARY_MESSAGE)
        clock = RequestClock(model.stats)
        ok = False
        try:
            parts = [part async for part in model.infer(request, uuid.uuid4().hex, clock)]
            start_ns = time.monotonic_ns()
            response = encode_response(model.config, request.id, parts[-1].outputs, None)
            clock.output(time.monotonic_ns() - start_ns)
            ok = True
        finally:
            clock.finish(ok)
        return response

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest | MalformedMessage],
                               context: Any) -> AsyncIterator[pb.ModelStreamInferResponse]:
        session = _StreamSession(self.registry, self.accepting)
        reader = asyncio.create_task(session.read(requests))
        try:
            while (item := await session.responses.get()) is not _END:
                yield item
        finally:
            reader.cancel()
            await session.close()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


class _StreamSession:
    """The requests in flight on one ModelStreamInfer stream."""

    def __init__(self, registry: ModelRegistry, accepting: Callable[[], bool]) -> None:
        self.registry = registry
        self.accepting = accepting
        self.responses: asyncio.Queue[object] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._by_client_id: dict[str, tuple[TritonModel, str]] = {}   # client id -> (model, engine id)

    async def read(self, requests: AsyncIterator[pb.ModelInferRequest | MalformedMessage]) -> None:
        try:
            async for request in requests:
                self._dispatch(request)
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
        finally:
            self.responses.put_nowait(_END)

    def _dispatch(self, request: pb.ModelInferRequest | MalformedMessage) -> None:
        """Start a request (synchronously registering its id, so that a `stop` right behind it finds it)."""
        if isinstance(request, MalformedMessage):
            self._error("", "", request.error())
            return
        try:
            if not self.accepting():
                raise Unavailable(DRAINING_MESSAGE)
            model = self.registry.triton_model(request.model_name, request.model_version)
            if self._is_stop(request, model):
                return
            if request.id in self._by_client_id:
                raise InvalidArgument("id", f"{request.id[:64]!r} is already in flight on this stream")
        except ServiceError as exc:
            self._error(request.id, request.model_name, exc)
            return
        engine_id = uuid.uuid4().hex
        if request.id:
            self._by_client_id[request.id] = (model, engine_id)
        task = asyncio.create_task(self._run(request, model, engine_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _is_stop(self, request: pb.ModelInferRequest, model: TritonModel) -> bool:
        """A `stop` = true request cancels the in-flight request with the same id (and is itself answered
        only by an empty final response when it asked for one)."""
        if not any(t.name == "stop" for t in request.inputs):
            return False
        if not scalar_bool(decode_inputs(request, model.config), "stop"):
            return False
        running = self._by_client_id.get(request.id)
        if running is not None:
            running[0].served.abort(running[1])     # it ends with a final response of its own
        if _empty_final(request):
            self._respond(encode_response(model.config, request.id, [], True))
        return True

    async def _run(self, request: pb.ModelInferRequest, model: TritonModel, engine_id: str) -> None:
        empty_final = _empty_final(request)
        clock = RequestClock(model.stats)
        ok = False
        try:
            async with contextlib.aclosing(model.infer(request, engine_id, clock)) as parts:
                async for part in parts:
                    start_ns = time.monotonic_ns()
                    self._respond(encode_response(model.config, request.id, part.outputs,
                                                  part.final and not empty_final))
                    clock.output(time.monotonic_ns() - start_ns)
            if empty_final:
                self._respond(encode_response(model.config, request.id, [], True))
            ok = True
        except Exception as exc:
            self._error(request.id, request.model_name, exc)
        finally:
            if self._by_client_id.get(request.id, (None, ""))[1] == engine_id:
                del self._by_client_id[request.id]
            clock.finish(ok)

    def _respond(self, response: pb.ModelInferResponse) -> None:
        self.responses.put_nowait(pb.ModelStreamInferResponse(infer_response=response))

    def _error(self, request_id: str, model_name: str, exc: BaseException) -> None:
        _, message = status_for(exc)
        response = pb.ModelStreamInferResponse(error_message=message)
        response.infer_response.id = request_id
        response.infer_response.model_name = model_name
        self.responses.put_nowait(response)

    async def close(self) -> None:
        """Cancel what still runs (client gone or stream cancelled): each cancellation aborts its request."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _empty_final(request: pb.ModelInferRequest) -> bool:
    """The client asked for a separate, empty response carrying triton_final_response."""
    return EMPTY_FINAL in request.parameters and request.parameters[EMPTY_FINAL].bool_param
