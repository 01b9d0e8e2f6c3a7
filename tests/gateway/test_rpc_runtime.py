"""The server runtime every tier shares, over a real in-process gRPC server with a fake
Generation servicer: the interceptor chain (auth, request ids, error mapping), admission with
RetryInfo, the client SDK's retries, drain, and TLS/mTLS handshakes and refusals."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.errors import InvalidRequestError
from core.rich_errors import retry_after_of
from core.tls import TLSConfig
from pdserve.client import NO_RETRY, AsyncClient, Client, RetryPolicy
from protos.pdserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from server_runtime.grpc_runtime import (
    BASE_STATUS_CODES,
    Lifecycle,
    Refused,
    ServerHandle,
    start_server,
)
from server_runtime.interceptors import BearerAuth, CallScope
from tests.gateway.certs import Pki, make_pki

SERVICE = "pdserve.v1.Generation"
WORK = ("/pdserve.v1.Generation/Generate",)
TOKEN = "s3cret-token"


class FakeGeneration(generation_pb2_grpc.GenerationServicer):
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.seen: list[tuple[str, str]] = []  # (request field, bound log context)

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        bound = structlog.contextvars.get_contextvars().get("request_id", "")
        self.seen.append((request.request_id, bound))
        if request.prompt == "invalid":
            raise InvalidRequestError("prompt is invalid")
        if request.prompt == "bug":
            raise RuntimeError("a bug")
        if request.prompt == "hold":
            await self.release.wait()
        yield generation_pb2.GenerateResponse(
            request_id=request.request_id,
            token_ids=[1, 2],
            text="ok",
            finish_reason=common_pb2.FINISH_REASON_STOP,
        )


async def _serve(
    *,
    tokens: tuple[str, ...] = (),
    tls: TLSConfig | None = None,
    lifecycle: Lifecycle | None = None,
) -> tuple[ServerHandle, FakeGeneration, str]:
    servicer = FakeGeneration()
    lifecycle = lifecycle or Lifecycle()
    interceptors: list[grpc.aio.ServerInterceptor] = [CallScope(lifecycle, WORK, BASE_STATUS_CODES)]
    if tokens:
        interceptors.insert(0, BearerAuth(tokens))
    handle = await start_server(
        "127.0.0.1:0",
        [SERVICE],
        [functools.partial(generation_pb2_grpc.add_GenerationServicer_to_server, servicer)],
        tls=tls,
        lifecycle=lifecycle,
        interceptors=interceptors,
    )
    await handle.set_serving([SERVICE], True)
    return handle, servicer, f"127.0.0.1:{handle.port}"


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())


async def _generate(client: AsyncClient, prompt: str = "hi", **kw: object) -> list[str]:
    return [c.text async for c in client.generate(prompt, **kw)]  # type: ignore[arg-type]


def test_bearer_auth_refuses_without_a_valid_token_and_lets_health_through() -> None:
    async def body() -> None:
        handle, _, address = await _serve(tokens=(TOKEN, "other"))
        try:
            for token, why in ((None, "missing"), ("wrong", "invalid")):
                async with AsyncClient(address, token=token) as client:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await _generate(client)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert why in (info.value.details() or "")
            async with AsyncClient(address, token=TOKEN) as client:
                assert await _generate(client) == ["ok"]
            async with grpc.aio.insecure_channel(address) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=SERVICE)
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await handle.server.stop(0)

    run(body)


def test_request_id_from_field_then_metadata_then_fresh_and_bound_on_logs() -> None:
    async def body() -> None:
        handle, servicer, address = await _serve()
        try:
            async with AsyncClient(address) as client:
                await _generate(client, request_id="from-field")
            async with grpc.aio.insecure_channel(address) as channel:
                stub = generation_pb2_grpc.GenerationStub(channel)
                call = stub.Generate(
                    generation_pb2.GenerateRequest(prompt="hi"),
                    metadata=(("x-request-id", "from-metadata"),),
                )
                assert [m.request_id async for m in call] == ["from-metadata"]
                call = stub.Generate(generation_pb2.GenerateRequest(prompt="hi"))
                [fresh] = [m.request_id async for m in call]
            assert servicer.seen[0] == ("from-field", "from-field")
            assert servicer.seen[1] == ("from-metadata", "from-metadata")
            assert len(fresh) == 32 and servicer.seen[2] == (fresh, fresh)
        finally:
            await handle.server.stop(0)

    run(body)


def test_exceptions_map_to_status_once() -> None:
    async def body() -> None:
        handle, _, address = await _serve()
        try:
            async with AsyncClient(address) as client:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await _generate(client, "invalid")
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert info.value.details() == "prompt is invalid"
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await _generate(client, "bug")
                assert info.value.code() == grpc.StatusCode.INTERNAL
        finally:
            await handle.server.stop(0)

    run(body)


def test_full_server_refuses_with_retry_info_and_the_sdk_retries() -> None:
    async def body() -> None:
        lifecycle = Lifecycle(max_in_flight=1, max_queued=0, retry_after_s=0.2)
        handle, servicer, address = await _serve(lifecycle=lifecycle)
        try:
            async with AsyncClient(address) as client:
                held = asyncio.create_task(_generate(client, "hold"))
                while lifecycle.in_flight == 0:
                    await asyncio.sleep(0.01)
                async with AsyncClient(address, retry=NO_RETRY) as no_retry:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await _generate(no_retry)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert retry_after_of(info.value) == pytest.approx(0.2)
                asyncio.get_running_loop().call_later(0.3, servicer.release.set)
                start = time.monotonic()
                assert await _generate(client) == ["ok"]  # retried after >= 0.2 s
                assert time.monotonic() - start >= 0.2
                assert await held == ["ok"]
            servicer.release.clear()
            sync_result: list[list[str]] = []
            held = asyncio.create_task(_generate(AsyncClient(address), "hold"))
            while lifecycle.in_flight == 0:
                await asyncio.sleep(0.01)

            def sync_call() -> None:
                with Client(address, retry=RetryPolicy(max_attempts=20)) as client:
                    sync_result.append([c.text for c in client.generate("hi", timeout=10)])

            thread = threading.Thread(target=sync_call)
            thread.start()
            await asyncio.sleep(0.3)
            servicer.release.set()
            await asyncio.to_thread(thread.join)
            assert sync_result == [["ok"]]
            await held
        finally:
            await handle.server.stop(0)

    run(body)


def test_queued_calls_wait_for_a_slot() -> None:
    async def body() -> None:
        lifecycle = Lifecycle(max_in_flight=1, max_queued=1)
        await lifecycle.enter()
        waiter = asyncio.create_task(lifecycle.enter(timeout=5))
        await asyncio.sleep(0.01)
        with pytest.raises(Refused) as info:
            await lifecycle.enter()  # queue full
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        lifecycle.leave()
        await waiter  # handed the slot
        assert lifecycle.in_flight == 1
        with pytest.raises(Refused):
            await lifecycle.enter(timeout=0.05)  # no slot freed in time
        lifecycle.drain()
        with pytest.raises(Refused) as info:
            await lifecycle.enter()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        lifecycle.leave()
        assert await lifecycle.wait_idle(0.1)

    run(body)


def test_drain_refuses_new_work_and_lets_streams_in_flight_finish() -> None:
    async def body() -> None:
        handle, servicer, address = await _serve()
        async with AsyncClient(address) as client:
            held = asyncio.create_task(_generate(client, "hold"))
            while handle.lifecycle.in_flight == 0:
                await asyncio.sleep(0.01)
            drain = asyncio.create_task(handle.drain_and_stop([SERVICE], grace_s=10))
            while not handle.lifecycle.draining:
                await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _generate(client)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            async with grpc.aio.insecure_channel(address) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=SERVICE)
                )
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            servicer.release.set()
            assert await held == ["ok"]
            await asyncio.wait_for(drain, 5)

    run(body)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_mutual_tls_handshakes_and_refusals(pki: Pki) -> None:
    server_tls = TLSConfig(
        cert=pki.server_cert, key=pki.server_key, ca=pki.ca, require_client_cert=True
    )

    async def body() -> None:
        handle, _, address = await _serve(tls=server_tls)
        try:
            good = TLSConfig(cert=pki.client_cert, key=pki.client_key, ca=pki.ca)
            async with AsyncClient(address, tls=good) as client:
                assert await _generate(client, timeout=5) == ["ok"]
            refused = {
                "plaintext": None,
                "no client certificate": TLSConfig(ca=pki.ca),
                "client certificate of another CA": TLSConfig(
                    cert=pki.rogue_client_cert, key=pki.rogue_client_key, ca=pki.ca
                ),
                "server not trusted": TLSConfig(
                    cert=pki.client_cert, key=pki.client_key, ca=pki.rogue_ca
                ),
            }
            for what, tls in refused.items():
                async with AsyncClient(address, tls=tls, retry=NO_RETRY) as client:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await _generate(client, timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, what
        finally:
            await handle.server.stop(0)

    run(body)


def test_tls_without_client_certificates(pki: Pki, tmp_path: Path) -> None:
    async def body() -> None:
        tls = TLSConfig(cert=pki.server_cert, key=pki.server_key)
        handle, _, address = await _serve(tls=tls, tokens=(TOKEN,))
        try:
            async with AsyncClient(address, tls=TLSConfig(ca=pki.ca), token=TOKEN) as client:
                assert await _generate(client, timeout=5) == ["ok"]
        finally:
            await handle.server.stop(0)

    run(body)
