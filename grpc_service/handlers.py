"""Registering servicer methods with grpc.aio: the guard every RPC of both APIs passes through.

What it is for: `register_service(server, service_descriptor, methods, guard)`
builds the method handlers from the service's protobuf descriptor, so that for
every RPC, in one place:

* a request that does not parse (e.g. invalid UTF-8 in a string field) is
  INVALID_ARGUMENT instead of gRPC's default INTERNAL ("Exception deserializing
  request"); stream requests arrive as `MalformedMessage` items instead;
* while the server drains (SIGTERM), new RPCs are answered UNAVAILABLE;
* an exception escaping a servicer method becomes its status (errors.status_for),
  and every refused RPC is counted by method and status code.

Health and reflection are registered by their own libraries and stay reachable
while draining (health then reports NOT_SERVING).
Not for: what the methods do (native_service / triton_service).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from grpc_service.errors import InvalidArgument, Unavailable, status_for

DRAINING_MESSAGE = "the server is shutting down; send new requests to another replica"


@dataclass(frozen=True, slots=True)
class MalformedMessage:
    """Stands in for a request message that could not be parsed."""

    type_name: str

    def error(self) -> InvalidArgument:
        return InvalidArgument("request", f"not a valid {self.type_name} message "
                                          "(string fields must be valid UTF-8)")


@dataclass(frozen=True, slots=True)
class RpcGuard:
    """`accepting()` is False once the server drains; `count_error(method, code)` records a failed RPC."""

    accepting: Callable[[], bool]
    count_error: Callable[[str, str], None]

    async def fail(self, context: grpc.aio.ServicerContext, method: str, exc: BaseException) -> NoReturn:
        """End the RPC with the status for `exc` (context.abort raises)."""
        code, message = status_for(exc)
        self.count_error(method, code.name.lower())
        await context.abort(code, message)
        raise AssertionError("context.abort returned")


def register_service(server: grpc.aio.Server, service: ServiceDescriptor,
                     methods: Mapping[str, Callable[..., Any]], guard: RpcGuard) -> None:
    """Register `methods` (RPC name -> bound coroutine or async generator) of one service."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        fn = methods.get(method.name)
        if fn is None:
            continue                         # left out: clients get UNIMPLEMENTED
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        kwargs = {"request_deserializer": _safe_parser(request_cls),
                  "response_serializer": response_cls.SerializeToString}
        streaming = (method.client_streaming, method.server_streaming)
        name = method.full_name
        if streaming == (False, False):
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(_unary(fn, guard, name), **kwargs)
        elif streaming == (False, True):
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(_unary_stream(fn, guard, name), **kwargs)
        elif streaming == (True, True):
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(_stream_stream(fn, guard, name),
                                                                          **kwargs)
        else:
            raise ValueError(f"{method.full_name}: client-streaming RPCs are not used by this server")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _safe_parser(cls: type[Message]) -> Callable[[bytes], Message | MalformedMessage]:
    def parse(data: bytes) -> Message | MalformedMessage:
        try:
            return cls.FromString(data)
        except (DecodeError, UnicodeDecodeError, ValueError):
            return MalformedMessage(cls.DESCRIPTOR.name)

    return parse


async def _admit(request: object, context: grpc.aio.ServicerContext, guard: RpcGuard, method: str) -> None:
    if not guard.accepting():
        await guard.fail(context, method, Unavailable(DRAINING_MESSAGE))
    if isinstance(request, MalformedMessage):
        await guard.fail(context, method, request.error())


def _unary(fn: Callable[..., Any], guard: RpcGuard, method: str) -> Callable[..., Any]:
    async def handle(request: object, context: grpc.aio.ServicerContext) -> object:
        await _admit(request, context, guard, method)
        try:
            return await fn(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await guard.fail(context, method, exc)

    return handle


def _unary_stream(fn: Callable[..., Any], guard: RpcGuard, method: str) -> Callable[..., Any]:
    async def handle(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
        await _admit(request, context, guard, method)
        try:
            async for response in fn(request, context):
                yield response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await guard.fail(context, method, exc)

    return handle


def _stream_stream(fn: Callable[..., Any], guard: RpcGuard, method: str) -> Callable[..., Any]:
    async def handle(requests: AsyncIterator[object], context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
        await _admit(None, context, guard, method)
        try:
            async for response in fn(requests, context):
                yield response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await guard.fail(context, method, exc)

    return handle
