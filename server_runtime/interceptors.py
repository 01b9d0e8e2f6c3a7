"""The server interceptor chain every pdserve server runs (outermost first)::

    BearerAuth (public API only)  ->  CallScope  ->  servicer method

Only ``pdserve.v1`` methods are intercepted: health, reflection and anything else pass through
untouched, so probes work without a token and during a drain. An exception a servicer raises is
mapped to a status once, here (:class:`CallScope`).
"""

from __future__ import annotations

import asyncio
import hmac
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
import structlog

from server_runtime.grpc_runtime import Lifecycle, abort_with, status_for

log = structlog.get_logger(__name__)

OWN_PREFIX = "/pdserve.v1."
REQUEST_ID_KEY = "x-request-id"

Handler = Any  # grpc.RpcMethodHandler (untyped in grpc)


def metadata_value(metadata: Iterable[Any] | None, key: str) -> str | None:
    for item in metadata or ():
        if item[0] == key:
            value = item[1]
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def _same_kind(
    handler: Handler,
    unary: Callable[..., Awaitable[Any]] | None,
    stream: Callable[..., AsyncIterator[Any]] | None,
) -> Handler:
    if handler.unary_stream is not None and stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_unary is not None and unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


def bearer_refusal(header: str | None, tokens: Sequence[bytes]) -> str | None:
    """None when ``header`` (an ``authorization`` value) names one of ``tokens``, else why
    not (the gRPC interceptor and the HTTP API share this check)."""
    if header is None:
        return "missing credentials: send 'authorization: Bearer <token>'"
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "malformed authorization: expected 'Bearer <token>'"
    given = token.strip().encode()
    # compare_digest against every token, no early exit: timing does not reveal which matched
    matched = [hmac.compare_digest(given, known) for known in tokens]
    return None if any(matched) else "invalid bearer token"


class BearerAuth(grpc.aio.ServerInterceptor):
    """Bearer-token authentication of the methods under ``protected`` prefixes: a call without
    ``authorization: Bearer <token>`` naming a known token is refused (UNAUTHENTICATED) before
    the servicer does any work. The gateway installs it when tokens are configured."""

    def __init__(self, tokens: Iterable[str], protected: tuple[str, ...] = (OWN_PREFIX,)) -> None:
        self._tokens = [t.encode() for t in tokens if t]
        if not self._tokens:
            raise ValueError("bearer authentication needs at least one token")
        self._protected = protected

    def _allowed(self, header: str | None) -> str | None:
        """None when allowed, else why not."""
        return bearer_refusal(header, self._tokens)

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Handler]], details: Any
    ) -> Handler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._protected):
            return handler
        why = self._allowed(metadata_value(details.invocation_metadata, "authorization"))
        if why is None:
            return handler
        log.info("request_unauthenticated", method=details.method, reason=why)

        async def deny_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

        async def deny_stream(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
            yield  # pragma: no cover - makes this an async generator

        return _same_kind(handler, deny_unary, deny_stream)


class CallScope(grpc.aio.ServerInterceptor):
    """Request-id binding, admission of work calls, and the one exception-to-status mapping.

    The request id (the request's ``request_id`` field, else the ``x-request-id`` metadata, else
    a fresh one, written back into an empty field) is bound on every log line of the call.
    ``work_methods`` are admitted through the server's :class:`Lifecycle` (bounded work in
    flight, refusal while draining). An exception becomes its own ``code`` if it carries one,
    else the most specific ``status_table`` entry (INTERNAL, logged, when none), with a RetryInfo
    detail on RESOURCE_EXHAUSTED.
    """

    def __init__(
        self,
        lifecycle: Lifecycle,
        work_methods: Iterable[str],
        status_table: dict[type[Exception], grpc.StatusCode],
    ) -> None:
        self.lifecycle = lifecycle
        self.work_methods = frozenset(work_methods)
        self.table = status_table

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Handler]], details: Any
    ) -> Handler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(OWN_PREFIX):
            return handler
        work = details.method in self.work_methods
        given_id = metadata_value(details.invocation_metadata, REQUEST_ID_KEY)
        inner_stream, inner_unary = handler.unary_stream, handler.unary_unary

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with structlog.contextvars.bound_contextvars(request_id=_request_id(request, given_id)):
                entered = False
                try:
                    if work:
                        await self.lifecycle.enter(context.time_remaining())
                        entered = True
                    async for message in inner_stream(request, context):
                        yield message
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:
                    await self._abort(context, exc)
                finally:
                    if entered:
                        self.lifecycle.leave()

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with structlog.contextvars.bound_contextvars(request_id=_request_id(request, given_id)):
                entered = False
                try:
                    if work:
                        await self.lifecycle.enter(context.time_remaining())
                        entered = True
                    return await inner_unary(request, context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:
                    await self._abort(context, exc)
                finally:
                    if entered:
                        self.lifecycle.leave()

        return _same_kind(handler, unary, stream)

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        code = status_for(exc, self.table)
        if code is grpc.StatusCode.INTERNAL:
            log.error("request_internal_error", error=str(exc), exc_info=exc)
        await abort_with(context, exc, code)


def _request_id(request: Any, given: str | None) -> str:
    """The call's request id; an empty ``request_id`` field is filled in."""
    current = getattr(request, "request_id", None)
    if current:
        return str(current)
    rid = given or uuid.uuid4().hex
    if current is not None:
        request.request_id = rid
    return rid
