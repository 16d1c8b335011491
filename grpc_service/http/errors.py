"""HTTP statuses and OpenAI's error JSON for the errors every API raises.

What it is for: `error_response(exc)`: the status code (errors.status_for's
gRPC code mapped to HTTP: INVALID_ARGUMENT 400, NOT_FOUND 404,
RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, ...; `BodyTooLarge` 413) and
`{"error": {"message", "type", "param", "code"}}` with `param` naming the
offending field where the error knows it.
Not for: deciding what is an error (the decoders and the runtime raise the typed errors).
"""
from __future__ import annotations

import grpc
from starlette.responses import JSONResponse

from grpc_service.errors import InvalidArgument, ModelNotFound, ServiceError, status_for
from grpc_service.http.responses import error_body
from runtime.errors import FieldError

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,
}
ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable_error"}
ERROR_CODES = {404: "model_not_found", 413: "request_too_large", 429: "rate_limit_exceeded",
               503: "service_unavailable"}


class BodyTooLarge(ServiceError):
    """The request body is larger than the server accepts (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"body: the request is larger than the limit of {limit} bytes (--max-message-bytes)")


def http_status(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, client-facing message) for any exception raised while serving a request."""
    if isinstance(exc, BodyTooLarge):
        return 413, exc.message
    code, message = status_for(exc)
    return HTTP_STATUS.get(code, 500), message


def error_json(exc: BaseException) -> tuple[int, dict]:
    status, message = http_status(exc)
    param = exc.field if isinstance(exc, (InvalidArgument, FieldError)) else (
        "model" if isinstance(exc, ModelNotFound) else None)
    return status, error_body(message, ERROR_TYPES.get(status, "server_error"), param, ERROR_CODES.get(status))


def error_response(exc: BaseException) -> JSONResponse:
    status, body = error_json(exc)
    return JSONResponse(body, status_code=status)
