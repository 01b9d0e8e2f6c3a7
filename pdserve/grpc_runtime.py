"""What every pdserve gRPC server shares: health, reflection, error mapping, graceful stop."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterable

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.errors import (
    EngineError,
    EngineStoppedError,
    InvalidRequestError,
    ModelLoadError,
    OutOfBlocksError,
)

log = structlog.get_logger(__name__)

# Domain failures -> gRPC status codes. Services extend this with their own exceptions.
BASE_STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    OutOfBlocksError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EngineStoppedError: grpc.StatusCode.UNAVAILABLE,
    ModelLoadError: grpc.StatusCode.FAILED_PRECONDITION,
    EngineError: grpc.StatusCode.INTERNAL,
}


def status_for(
    exc: BaseException, table: dict[type[Exception], grpc.StatusCode]
) -> grpc.StatusCode:
    """The status code of the most specific class in ``table`` that ``exc`` is an instance of."""
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return grpc.StatusCode.INTERNAL


class ServerHandle:
    """A started aio server with its health servicer."""

    def __init__(
        self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, port: int
    ):
        self.server = server
        self.health = health_servicer
        self.port = port

    async def set_serving(self, services: Iterable[str], serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *services]:
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start_server(
    address: str, service_names: list[str], register: list, max_message_mb: int = 16
) -> ServerHandle:
    """Create, register, and start an aio server on ``address``; health starts NOT_SERVING."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_mb << 20),
            ("grpc.max_send_message_length", max_message_mb << 20),
            ("grpc.so_reuseport", 0),
        ]
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
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    handle = ServerHandle(server, health_servicer, port)
    await handle.set_serving(service_names, False)
    return handle


async def serve_until_signalled(
    handle: ServerHandle, service_names: list[str], grace_s: float = 5.0
) -> None:
    """Mark SERVING, wait for SIGINT/SIGTERM, then go NOT_SERVING and stop within ``grace_s``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await handle.set_serving(service_names, True)
    server_done = asyncio.ensure_future(handle.server.wait_for_termination())
    stop_wait = asyncio.ensure_future(stop.wait())
    await asyncio.wait([server_done, stop_wait], return_when=asyncio.FIRST_COMPLETED)
    log.info("server_stopping", grace_s=grace_s)
    await handle.set_serving(service_names, False)
    await handle.stop(grace_s)
    server_done.cancel()
    stop_wait.cancel()
