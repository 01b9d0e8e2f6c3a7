"""Request bytes that do not parse as the method's message: every pdserve server answers
INVALID_ARGUMENT saying so (grpc.aio alone answers UNKNOWN), on its own methods and on health,
behind authentication, and without taking an admission slot for good."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2

from protos.pdserve.v1 import generation_pb2, generation_pb2_grpc, worker_pb2, worker_pb2_grpc
from server_runtime.grpc_runtime import BASE_STATUS_CODES, Lifecycle, ServerHandle, start_server
from server_runtime.interceptors import BearerAuth, CallScope

GARBAGE = b"\xff\xff\xff"


class Generation(generation_pb2_grpc.GenerationServicer):
    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        yield generation_pb2.GenerateResponse(request_id=request.request_id, text="ok")


class Prefill(worker_pb2_grpc.PrefillServicer):
    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        return worker_pb2.PrefillResponse(first_token_id=7)


async def _serve(tokens: tuple[str, ...] = ()) -> tuple[ServerHandle, str]:
    lifecycle = Lifecycle()
    work = ("/pdserve.v1.Generation/Generate", "/pdserve.v1.Prefill/Prefill")
    chain: list[grpc.aio.ServerInterceptor] = [CallScope(lifecycle, work, BASE_STATUS_CODES)]
    if tokens:
        chain.insert(0, BearerAuth(tokens))
    handle = await start_server(
        "127.0.0.1:0",
        ["pdserve.v1.Generation", "pdserve.v1.Prefill"],
        [
            functools.partial(generation_pb2_grpc.add_GenerationServicer_to_server, Generation()),
            functools.partial(worker_pb2_grpc.add_PrefillServicer_to_server, Prefill()),
        ],
        lifecycle=lifecycle,
        interceptors=chain,
    )
    return handle, f"127.0.0.1:{handle.port}"


def _raw(payload: bytes) -> object:
    return lambda _: payload


async def _stream_status(
    channel: grpc.aio.Channel, method: str, payload: bytes
) -> grpc.aio.AioRpcError:
    call = channel.unary_stream(
        method,
        request_serializer=_raw(payload),
        response_deserializer=generation_pb2.GenerateResponse.FromString,
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call(None, timeout=5):
            pass
    return info.value


async def _unary_status(
    channel: grpc.aio.Channel, method: str, payload: bytes
) -> grpc.aio.AioRpcError:
    call = channel.unary_unary(method, request_serializer=_raw(payload))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(None, timeout=5)
    return info.value


def test_undecodable_requests_are_invalid_argument_on_every_kind_of_method() -> None:
    async def body() -> None:
        handle, address = await _serve()
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                err = await _stream_status(channel, "/pdserve.v1.Generation/Generate", GARBAGE)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "could not be decoded" in (err.details() or "")
                assert "pdserve.v1.Generation/Generate" in (err.details() or "")
                for method in ("/pdserve.v1.Prefill/Prefill", "/pdserve.v1.Prefill/GetStatus"):
                    err = await _unary_status(channel, method, GARBAGE)
                    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, method
                    assert "could not be decoded" in (err.details() or "")
                err = await _unary_status(channel, "/grpc.health.v1.Health/Check", GARBAGE)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
                # a string field holding invalid UTF-8 is undecodable too
                bad_utf8 = b"\x0a\x02\xc3\x28"  # field 1 (prompt), 2 bytes, not UTF-8
                err = await _stream_status(channel, "/pdserve.v1.Generation/Generate", bad_utf8)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
                # and good requests still pass
                stub = generation_pb2_grpc.GenerationStub(channel)
                call = stub.Generate(generation_pb2.GenerateRequest(prompt="hi"))
                assert [m.text async for m in call] == ["ok"]
                check = channel.unary_unary(
                    "/grpc.health.v1.Health/Check",
                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                    response_deserializer=health_pb2.HealthCheckResponse.FromString,
                )
                assert (await check(health_pb2.HealthCheckRequest())).status is not None
            assert handle.lifecycle.in_flight == 0
        finally:
            await handle.server.stop(0)

    asyncio.run(body())


def test_authentication_is_checked_before_decoding() -> None:
    async def body() -> None:
        handle, address = await _serve(tokens=("tok",))
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                err = await _stream_status(channel, "/pdserve.v1.Generation/Generate", GARBAGE)
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await handle.server.stop(0)

    asyncio.run(body())
