"""Every failure of the HTTP API as an OpenAI error object, mapped in one place.

A domain error gets the gRPC status the gRPC API would give it (:data:`gateway.errors.
STATUS_CODES`, the same table), and that status its HTTP status here (:data:`HTTP_STATUS`), so
one request fails the same way over both APIs: 400 bad request, 401 no valid token, 404 unknown
model, 429 shed by admission (with ``Retry-After``), 503 no worker can serve, 504 deadline.
"""

from __future__ import annotations

import json
import math
from typing import Any

import grpc
from starlette.responses import JSONResponse

from gateway.errors import STATUS_CODES
from server_runtime.grpc_runtime import DEFAULT_RETRY_AFTER_S, status_for

# gRPC status -> (HTTP status, OpenAI error type, OpenAI error code)
HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "invalid_request_error", "permission_denied"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.CANCELLED: (499, "server_error", "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error", "not_implemented"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    # not the client's to fix: a worker refusing the state it is in (FAILED_PRECONDITION is never
    # retried elsewhere; ABORTED, a transfer it rejected, only until failover gives up)
    grpc.StatusCode.FAILED_PRECONDITION: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.ABORTED: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
}
INTERNAL = (500, "server_error", "internal_error")


class APIError(Exception):
    """A failure the HTTP layer itself decides (unknown model, bad JSON, missing token)."""

    def __init__(self, code: grpc.StatusCode, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


def error_body(
    kind: str, code: str | None, message: str, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def http_error(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``exc`` as (HTTP status, OpenAI error body, extra headers)."""
    code = status_for(exc, STATUS_CODES)
    status, kind, err_code = HTTP_STATUS.get(code, INTERNAL)
    message = str(exc) if code is not grpc.StatusCode.INTERNAL else f"internal error: {exc}"
    headers: dict[str, str] = {}
    if status == 429:
        retry = getattr(exc, "retry_after_s", None) or DEFAULT_RETRY_AFTER_S
        headers["retry-after"] = str(max(1, math.ceil(retry)))  # whole seconds (RFC 9110)
        headers["retry-after-ms"] = str(round(retry * 1000))  # what the openai SDK reads first
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    param = getattr(exc, "param", None)
    return status, error_body(kind, err_code, message, param), headers


def error_response(exc: BaseException) -> JSONResponse:
    status, body, headers = http_error(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def stream_error_event(exc: BaseException) -> bytes:
    """A failure after the stream's 200 was sent: an ``error`` event (then ``[DONE]``)."""
    _, body, _ = http_error(exc)
    return f"data: {json.dumps(body)}\n\n".encode()
