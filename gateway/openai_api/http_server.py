"""The HTTP API's server: uvicorn inside the gateway's own event loop, beside the gRPC server.

uvicorn installs no signal handlers here (the gateway's ``serve_until_signalled`` owns SIGTERM).
Draining is the gateway's: its :class:`~server_runtime.grpc_runtime.Lifecycle` refuses new work
(503) and waits for streams in flight, HTTP ones included, for the grace period; then
:meth:`HttpServer.stop` closes the listener and cancels whatever is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import structlog
import uvicorn
from starlette.types import ASGIApp

log = structlog.get_logger(__name__)

STOP_TIMEOUT_S = 2.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the gateway handles signals
        yield


def host_of(listen: str) -> str:
    """``127.0.0.1:50051`` -> ``127.0.0.1``; ``[::]:50051`` -> ``::``."""
    host = listen.rpartition(":")[0] or "0.0.0.0"
    return host.strip("[]")


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket (errors, such as a port in use, are raised here, not in
    uvicorn, which would exit the process)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"HTTP API cannot listen on {host}:{port}: {exc}") from exc
    return sock


class HttpServer:
    def __init__(self, app: ASGIApp, host: str, port: int) -> None:
        self.sock = bind(host, port)
        self.host = host
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            http="httptools",
            timeout_graceful_shutdown=1,
        )
        self.server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError("the HTTP API server stopped while starting")
            await asyncio.sleep(0.01)
        log.info("http_listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), STOP_TIMEOUT_S)
        except TimeoutError:
            self.server.force_exit = True
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        log.info("http_stopped")
