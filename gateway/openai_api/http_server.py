"""The HTTP API's server: uvicorn inside the gateway's own event loop, beside the gRPC server.

With the gateway's ``--tls-cert``/``--tls-key`` the HTTP API is served over TLS with the same
certificate as gRPC (and requires a client certificate signed by ``--tls-ca`` when gRPC does).
uvicorn installs no signal handlers here (the gateway's ``serve_until_signalled`` owns SIGTERM).
Draining is the gateway's: its :class:`~server_runtime.grpc_runtime.Lifecycle` refuses new work
(503) and waits for streams in flight, HTTP ones included, for the grace period; then
:meth:`HttpServer.stop` closes the listener and cancels whatever is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import structlog
import uvicorn
from starlette.types import ASGIApp

from core.tls import TLSConfig

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


def tls_options(tls: TLSConfig | None) -> dict[str, Any]:
    """uvicorn's TLS settings for the gateway's server-side TLS (none: plaintext)."""
    if tls is None or tls.cert is None:
        return {}
    options: dict[str, Any] = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
    if tls.ca is not None:
        options["ssl_ca_certs"] = str(tls.ca)
        options["ssl_cert_reqs"] = (
            ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
        )
    return options


class HttpServer:
    def __init__(self, app: ASGIApp, host: str, port: int, tls: TLSConfig | None = None) -> None:
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
            **tls_options(tls),
        )
        self.tls = bool(tls_options(tls))
        self.server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError("the HTTP API server stopped while starting")
            await asyncio.sleep(0.01)
        log.info("http_listening", host=self.host, port=self.port, tls=self.tls)

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
