"""Failures the gateway reports, each carrying the gRPC status code it maps to."""

from __future__ import annotations

from typing import NamedTuple

import grpc

from core.errors import EngineError
from server_runtime.grpc_runtime import BASE_STATUS_CODES

RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)
"""A worker call that ended with one of these may succeed on another worker: the worker died or
drains (UNAVAILABLE), is full (RESOURCE_EXHAUSTED, with the RetryInfo every pdserve server sends
then), cancelled the call itself as its drain's grace ran out (CANCELLED), or could not take
the transfer this route needed (ABORTED: an incompatible prefill/decode pair). Every other code
is the same wherever the request goes (a bad request, a missing method, a bug, the gRPC library
refusing to send the call) and is never retried."""

_SEEN_AS_UNAVAILABLE = frozenset({grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED})
# the gateway's own credentials, refused by a worker: the client did nothing wrong
_SEEN_AS_INTERNAL = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


class WorkerFailure(NamedTuple):
    """How the gateway treats a worker call that ended with some status."""

    code: grpc.StatusCode
    """What the client sees (once failover gives up, for a retryable failure)."""
    retryable: bool
    """Another worker may succeed."""


def worker_failure(code: grpc.StatusCode, retry_info: bool) -> WorkerFailure:
    """The treatment of a worker call that ended with ``code`` (``retry_info``: the status
    carried a RetryInfo detail). RESOURCE_EXHAUSTED without one is a transport limit (message or
    metadata too large), not capacity: the same on every worker."""
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return WorkerFailure(code, retry_info)
    if code in _SEEN_AS_INTERNAL:
        return WorkerFailure(grpc.StatusCode.INTERNAL, False)
    client_code = grpc.StatusCode.UNAVAILABLE if code in _SEEN_AS_UNAVAILABLE else code
    return WorkerFailure(client_code, code in RETRYABLE_CODES)


class UpstreamError(EngineError):
    """A worker call failed; ``code`` is what the client should see.

    ``tier`` and ``address`` name the worker (empty when no worker was involved);
    ``retryable``: another worker may succeed (:func:`worker_failure`); ``retry_after_s``: the
    worker's RetryInfo hint.
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
