"""The server interceptor chain every pdserve server runs (outermost first)::

    BearerAuth (public API only)  ->  CallScope  ->  servicer method

Only ``pdserve.v1`` methods are intercepted, but for one thing: request bytes that do not parse
as the method's message are answered INVALID_ARGUMENT on every unary-request method, health
included (grpc.aio itself would answer UNKNOWN, before any servicer code runs). Health,
reflection and anything else otherwise pass through untouched, so probes work without a token
and during a drain. An exception a servicer raises is mapped to a status once, here
(:class:`CallScope`).

Request ids travel from the gateway to every worker as ``x-request-id`` metadata, so they must
be valid metadata values: :func:`request_id_problem` states the rule the gateway enforces.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import re
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

MAX_REQUEST_ID_CHARS = 128
REQUEST_ID_RULE = (
    f"1 to {MAX_REQUEST_ID_CHARS} printable ASCII characters without spaces "
    "(a UUID, 'cmpl-...' and the like)"
)
_REQUEST_ID_CHAR = re.compile(r"[\x21-\x7e]")


def request_id_problem(value: str) -> str | None:
    """None when ``value`` can serve as a request id (:data:`REQUEST_ID_RULE`: it must travel
    as gRPC metadata and sit on log lines as it is), else what is wrong with it."""
    if not value:
        return "is empty"
    if len(value) > MAX_REQUEST_ID_CHARS:
        return f"has {len(value)} characters (at most {MAX_REQUEST_ID_CHARS})"
    for index, char in enumerate(value):
        if not _REQUEST_ID_CHAR.fullmatch(char):
            return f"has the character {char!a} at index {index}"
    return None


def loggable_request_id(value: str) -> str:
    """``value`` if it is a valid request id, else an escaped, bounded rendering of it (a
    client's newline must not start a log line)."""
    if request_id_problem(value) is None:
        return value
    return ascii(value[:MAX_REQUEST_ID_CHARS])


class UndecodableRequest:
    """Stands in for a request whose bytes do not parse as the method's message, so the call
    reaches :class:`CallScope`, which answers INVALID_ARGUMENT with :attr:`message`."""

    def __init__(self, method: str, error: Exception) -> None:
        self.message = f"the request to {method} could not be decoded: {error}"


def _tolerant(deserializer: Callable[[bytes], Any] | None, method: str) -> Any:
    """``deserializer`` returning an :class:`UndecodableRequest` where it would raise."""
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # protobuf's DecodeError, or any parser's complaint
            return UndecodableRequest(method, exc)

    return deserialize


async def _refuse_undecodable(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, UndecodableRequest):
        log.info("request_undecodable", error=request.message)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


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
    request_deserializer: Any = None,
) -> Handler:
    """``handler`` with its behaviour replaced by ``unary`` or ``stream`` (whichever matches its
    kind) and, if given, its ``request_deserializer``; other kinds are returned as they are."""
    deserializer = request_deserializer or handler.request_deserializer
    if handler.unary_stream is not None and stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            stream,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_unary is not None and unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


def _decoding_guarded(handler: Handler, method: str) -> Handler:
    """A method outside ``pdserve.v1`` (health): only undecodable requests are intercepted;
    a synchronous behaviour, or one with a request stream, is left as it is."""
    inner_stream, inner_unary = handler.unary_stream, handler.unary_unary
    deserializer = _tolerant(handler.request_deserializer, method)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await _refuse_undecodable(request, context)
        async for message in inner_stream(request, context):
            yield message

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _refuse_undecodable(request, context)
        return await inner_unary(request, context)

    if inner_stream is not None and inspect.isasyncgenfunction(inner_stream):
        return _same_kind(handler, None, stream, deserializer)
    if inner_unary is not None and inspect.iscoroutinefunction(inner_unary):
        return _same_kind(handler, unary, None, deserializer)
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
    """Request decoding, request-id binding, admission of work calls, and the one
    exception-to-status mapping.

    Request bytes that do not parse end the call with INVALID_ARGUMENT (any unary-request
    method, not only ``pdserve.v1``'s), before admission.
    The request id (the request's ``request_id`` field, else the ``x-request-id`` metadata, else
    a fresh one, written back into an empty field) is bound on every log line of the call
    (escaped if it breaks :data:`REQUEST_ID_RULE`; the gateway refuses such ids).
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
        if handler is None:
            return handler
        if not details.method.startswith(OWN_PREFIX):
            return _decoding_guarded(handler, details.method)
        work = details.method in self.work_methods
        given_id = metadata_value(details.invocation_metadata, REQUEST_ID_KEY)
        inner_stream, inner_unary = handler.unary_stream, handler.unary_unary
        deserializer = _tolerant(handler.request_deserializer, details.method)

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with structlog.contextvars.bound_contextvars(request_id=_request_id(request, given_id)):
                await _refuse_undecodable(request, context)
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
                await _refuse_undecodable(request, context)
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

        return _same_kind(handler, unary, stream, deserializer)

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        code = status_for(exc, self.table)
        if code is grpc.StatusCode.INTERNAL:
            log.error("request_internal_error", error=str(exc), exc_info=exc)
        await abort_with(context, exc, code)


def _request_id(request: Any, given: str | None) -> str:
    """The call's request id for its log lines (see :func:`loggable_request_id`); an empty
    ``request_id`` field is filled in."""
    current = getattr(request, "request_id", None)
    if current:
        return loggable_request_id(str(current))
    rid = given or uuid.uuid4().hex
    if current is not None:
        request.request_id = rid
    return loggable_request_id(rid)
