"""The one place where errors become gRPC status codes and client-facing messages.

What it is for: the typed errors the service raises (`InvalidArgument`,
`ModelNotFound`, `Overloaded`, `Unavailable`, `Unsupported`), and
`status_for(exc)`, which maps those and the runtime's typed errors to a status
code and a message that names the field and the limit. Anything unexpected
becomes INTERNAL with a fixed message; the details go to the server log only.
Not for: validation itself (each decoder raises these errors where it judges
input) or transport (handlers.py aborts the RPC; a Triton stream puts the
message in its response).
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from runtime.core.async_engine import EngineDeadError
from runtime.errors import FieldError

LOG = logging.getLogger(__name__)
INTERNAL_MESSAGE = "internal error; the request was not completed (details are in the server log)"


class ServiceError(Exception):
    """An error with a chosen status code and a message safe to show the client."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError, FieldError):
    """The request is malformed; `field` names the offending field or tensor (the runtime's FieldError,
    with the service's status code)."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field_name: str, message: str) -> None:
        FieldError.__init__(self, field_name, message)
        self.message = str(self)


class ModelNotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, model_name: str, version: str = "") -> None:
        which = f" version {version!r} (this server serves version '1')" if version else ""
        super().__init__(f"model: unknown model {model_name[:128]!r}{which}")
        self.model_name = model_name


class Overloaded(ServiceError):
    """The bounded queue is full; the client should retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, model_name: str, limit: int) -> None:
        super().__init__(f"model {model_name!r}: too many requests in flight (limit {limit}); retry later")
        self.limit = limit


class Unavailable(ServiceError):
    """Loading, warming up or shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class Unsupported(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED

    def __init__(self) -> None:
        super().__init__("deadline exceeded before the request finished; it was aborted")


class RequestFailed(ServiceError):
    """The engine failed the request mid-way; the message is the engine's sanitized one."""

    code = grpc.StatusCode.INTERNAL


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Status code and client-facing message for any exception raised while serving a request."""
    known = _known_status(exc)
    if known is not None:
        return known
    LOG.error("unexpected error while serving a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def outcome_for(exc: BaseException) -> str:
    """Metrics label for a request that ended with this exception (lower-case status name; never logs)."""
    known = _known_status(exc)
    return (known[0] if known is not None else grpc.StatusCode.INTERNAL).name.lower()


def _known_status(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, FieldError):
        # The runtime's typed refusals (SamplingParamsError, RequestRejectedError, ...): "field: limit".
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, EngineDeadError):
        return grpc.StatusCode.UNAVAILABLE, "the engine is not running; the server is unhealthy"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded().message
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED, "cancelled"
    return None
