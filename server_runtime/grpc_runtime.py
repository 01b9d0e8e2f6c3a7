"""What every pdserve gRPC server shares: health, reflection, TLS, the interceptor chain, error
mapping, admission (bounded work in flight) and graceful drain.

A server's life::

    start_server  -> NOT_SERVING (loading)  -> serve_until_signalled: SERVING
    SIGTERM/SIGINT -> NOT_SERVING, new work refused with UNAVAILABLE (callers go elsewhere)
                   -> work in flight finishes, for at most ``grace_s``
                   -> server.stop: what is left (watch streams, overdue work) is cancelled
"""

from __future__ import annotations

import asyncio
import collections
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable, Sequence

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from core.errors import (
    EngineError,
    EngineStoppedError,
    InvalidRequestError,
    ModelLoadError,
    OutOfBlocksError,
)
from core.rich_errors import rich_status
from core.tls import TLSConfig
from server_runtime.settings import KeepAlive

log = structlog.get_logger(__name__)

# Domain failures -> gRPC status codes. Services extend this with their own exceptions.
BASE_STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    OutOfBlocksError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EngineStoppedError: grpc.StatusCode.UNAVAILABLE,
    ModelLoadError: grpc.StatusCode.FAILED_PRECONDITION,
    EngineError: grpc.StatusCode.INTERNAL,
}

DEFAULT_RETRY_AFTER_S = 0.5
"""The RetryInfo delay on RESOURCE_EXHAUSTED when nothing better is known."""


def status_for(
    exc: BaseException, table: dict[type[Exception], grpc.StatusCode]
) -> grpc.StatusCode:
    """The status code of the most specific class in ``table`` that ``exc`` is an instance of.

    An exception carrying its own ``code`` (a :class:`grpc.StatusCode`) keeps it."""
    own = getattr(exc, "code", None)
    if isinstance(own, grpc.StatusCode):
        return own
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return grpc.StatusCode.INTERNAL


class Refused(Exception):
    """A call turned away before any work: ``code`` (UNAVAILABLE while draining,
    RESOURCE_EXHAUSTED when full), with a retry hint for RESOURCE_EXHAUSTED."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


async def abort_with(
    context: grpc.aio.ServicerContext, exc: BaseException, code: grpc.StatusCode
) -> None:
    """End the call with ``code`` and ``exc``'s message (plus its retry hint, if any)."""
    retry = getattr(exc, "retry_after_s", None)
    if retry is None and code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry = DEFAULT_RETRY_AFTER_S
    await context.abort_with_status(rich_status(code, str(exc), retry))


class Lifecycle:
    """Work calls in flight on one server, the bound on them, and the drain switch.

    ``max_in_flight`` calls run at once (0: no bound); up to ``max_queued`` more wait for a slot
    (each no longer than its deadline or ``max_wait_s``); past that a call is refused with
    RESOURCE_EXHAUSTED.
    Once :meth:`drain` is called every new call is refused with UNAVAILABLE.
    """

    def __init__(
        self,
        max_in_flight: int = 0,
        max_queued: int = 0,
        retry_after_s: float = DEFAULT_RETRY_AFTER_S,
        max_wait_s: float = 30.0,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self.max_wait_s = max_wait_s
        self.in_flight = 0
        self.total = 0
        self.draining = False
        self._drain_hooks: list[Callable[[], None]] = []
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._idle = asyncio.Event()
        self._idle.set()
        self.stopped = asyncio.Event()
        """Set when the server is about to stop: long-lived watch streams end."""

    async def enter(self, timeout: float | None = None) -> None:
        """Take a slot, waiting in the bounded queue if needed; raises :class:`Refused`."""
        if self.draining:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        if self.max_in_flight and self.in_flight >= self.max_in_flight:
            if len(self._waiters) >= self.max_queued:
                raise Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"server is at capacity: {self.in_flight} requests in progress "
                    f"(limit {self.max_in_flight}) and {len(self._waiters)} queued "
                    f"(limit {self.max_queued}); retry later",
                    self.retry_after_s,
                )
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                wait = self.max_wait_s if timeout is None else min(timeout, self.max_wait_s)
                await asyncio.wait_for(waiter, wait)  # the slot is handed over in leave()
            except TimeoutError:
                if _handed_over(waiter):
                    return
                raise Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "server is at capacity: no slot freed before the deadline",
                    self.retry_after_s,
                ) from None
            except BaseException:
                if _handed_over(waiter):
                    self.leave()  # the slot arrived as we were cancelled: pass it on
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            return
        self._take()

    def _take(self) -> None:
        self.in_flight += 1
        self.total += 1
        self._idle.clear()

    def leave(self) -> None:
        """Give the slot back (to the first live waiter, if any)."""
        self.in_flight -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._take()
                waiter.set_result(None)
                break
        if self.in_flight == 0:
            self._idle.set()

    def on_drain(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` (on the event loop) when the drain begins, before in-flight work is
        waited for: a decode worker starts migrating its sequences then."""
        self._drain_hooks.append(hook)

    def drain(self) -> None:
        first = not self.draining
        self.draining = True
        for hook in self._drain_hooks if first else ():
            try:
                hook()
            except Exception:
                log.exception("drain_hook_failed")
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(
                    Refused(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
                )

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no work is in flight; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


def _handed_over(waiter: asyncio.Future[None]) -> bool:
    return waiter.done() and not waiter.cancelled() and waiter.exception() is None


class ServerHandle:
    """A started aio server with its health servicer and lifecycle."""

    def __init__(
        self,
        server: grpc.aio.Server,
        health_servicer: health.aio.HealthServicer,
        port: int,
        lifecycle: Lifecycle,
    ):
        self.server = server
        self.health = health_servicer
        self.port = port
        self.lifecycle = lifecycle

    async def set_serving(self, services: Iterable[str], serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *services]:
            await self.health.set(name, status)

    async def drain_and_stop(self, services: Iterable[str], grace_s: float) -> None:
        """NOT_SERVING and refuse new work; let work in flight finish (``grace_s`` at most);
        then stop, cancelling what is left (watch streams, overdue work)."""
        self.lifecycle.drain()
        await self.set_serving(services, False)
        in_flight = self.lifecycle.in_flight
        finished = await self.lifecycle.wait_idle(grace_s)
        log.info(
            "server_drained" if finished else "server_drain_timeout",
            in_flight_at_start=in_flight,
            cancelled=self.lifecycle.in_flight,
            grace_s=grace_s,
        )
        self.lifecycle.stopped.set()  # watch streams (WatchLoad) end cleanly
        await asyncio.sleep(0.05)
        await self.health.enter_graceful_shutdown()
        # stop() cancels what is left (health Watch streams); grpc logs each cancelled stream
        # as an unhandled error, which at this point is expected: keep the shutdown log clean.
        logging.getLogger("grpc._cython.cygrpc").setLevel(logging.CRITICAL)
        await self.server.stop(0.2)


def server_options(
    max_message_mb: int = 16, keepalive: KeepAlive | None = None
) -> list[tuple[str, int]]:
    """``keepalive``: pings to clients, so a hung one cannot hold calls (default: on, 10 s)."""
    return [
        *(keepalive or KeepAlive()).grpc_options(),
        ("grpc.max_receive_message_length", max_message_mb << 20),
        ("grpc.max_send_message_length", max_message_mb << 20),
        ("grpc.so_reuseport", 0),
        # Clients keep channels alive with pings; allow them every 5 s (client keepalive >= 5 s).
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


async def start_server(
    address: str,
    service_names: list[str],
    register: list,
    max_message_mb: int = 16,
    *,
    tls: TLSConfig | None = None,
    lifecycle: Lifecycle | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    keepalive: KeepAlive | None = None,
) -> ServerHandle:
    """Create, register, and start an aio server on ``address``; health starts NOT_SERVING."""
    server = grpc.aio.server(
        options=server_options(max_message_mb, keepalive), interceptors=list(interceptors)
    )
    for add in register:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            *service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    if tls is not None:
        port = server.add_secure_port(address, tls.server_credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    handle = ServerHandle(server, health_servicer, port, lifecycle or Lifecycle())
    await handle.set_serving(service_names, False)
    return handle


async def serve_until_signalled(
    handle: ServerHandle,
    service_names: list[str],
    grace_s: float = 5.0,
    ready: Awaitable[object] | None = None,
) -> None:
    """Mark SERVING (once ``ready`` is done, if given), wait for SIGINT/SIGTERM, then drain
    (see :meth:`ServerHandle.drain_and_stop`)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server_done = asyncio.ensure_future(handle.server.wait_for_termination())
    stop_wait = asyncio.ensure_future(stop.wait())
    if ready is not None:
        ready_task = asyncio.ensure_future(ready)
        await asyncio.wait([ready_task, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        ready_task.cancel()
    if not stop.is_set():
        await handle.set_serving(service_names, True)
        await asyncio.wait([server_done, stop_wait], return_when=asyncio.FIRST_COMPLETED)
    log.info("server_stopping", grace_s=grace_s, in_flight=handle.lifecycle.in_flight)
    await handle.drain_and_stop(service_names, grace_s)
    server_done.cancel()
    stop_wait.cancel()
