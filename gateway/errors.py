"""Failures the gateway reports, each carrying the gRPC status code it maps to."""

from __future__ import annotations

import grpc

from core.errors import EngineError
from server_runtime.grpc_runtime import BASE_STATUS_CODES

# A worker call that ended with one of these may succeed on another worker: the worker died,
# drains, is full, or cancelled the call itself (its grace period ran out).
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ABORTED,
    }
)


class UpstreamError(EngineError):
    """A worker call failed; ``code`` is what the client should see.

    ``tier`` and ``address`` name the worker (empty when no worker was involved);
    ``retryable``: another worker may succeed; ``retry_after_s``: the worker's RetryInfo hint.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        tier: str = "",
        address: str = "",
        retryable: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.tier = tier
        self.address = address
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class NoWorkersError(EngineError):
    """No worker of a needed tier is configured or reachable (maps to UNAVAILABLE)."""

    code = grpc.StatusCode.UNAVAILABLE


class OverloadedError(EngineError):
    """Every reachable worker of a tier is at its limit (maps to RESOURCE_EXHAUSTED)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    **BASE_STATUS_CODES,
    NoWorkersError: grpc.StatusCode.UNAVAILABLE,
    OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
"""Domain failures -> gRPC status, for the gRPC servicer and the HTTP API alike."""
