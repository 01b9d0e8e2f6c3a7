"""``pdserve bench``'s client options: TLS, bearer token and retries on RESOURCE_EXHAUSTED,
against an in-process gateway stand-in (TLS, token auth, one call at a time with RetryInfo)."""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from core.tls import TLSConfig
from pdserve.bench.datasets import BenchRequest
from pdserve.bench.load import LoadSpec
from pdserve.bench.runner import ClientOptions, RunSettings, bench_gateway_async
from pdserve.cli import build_parser
from pdserve.client import RetryPolicy
from protos.pdserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from server_runtime.grpc_runtime import BASE_STATUS_CODES, Lifecycle, start_server
from server_runtime.interceptors import BearerAuth, CallScope
from tests.gateway.certs import Pki, make_pki

SERVICE = "pdserve.v1.Generation"
TOKEN = "bench-token-0123456789"
RETRY_AFTER_S = 0.05


class OneAtATime(generation_pb2_grpc.GenerationServicer):
    """Streams ``max_tokens`` tokens, slowly enough that concurrent calls are refused."""

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        n = request.sampling.max_tokens
        for i in range(n):
            await asyncio.sleep(0.01)
            last = i == n - 1
            yield generation_pb2.GenerateResponse(
                token_ids=[7],
                finish_reason=common_pb2.FINISH_REASON_LENGTH if last else 0,
                usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=i + 1),
            )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("bench-pki"))


async def _bench(pki: Pki, client: ClientOptions) -> list[str | None]:
    lifecycle = Lifecycle(max_in_flight=1, max_queued=0, retry_after_s=RETRY_AFTER_S)
    handle = await start_server(
        "127.0.0.1:0",
        [SERVICE],
        [functools.partial(generation_pb2_grpc.add_GenerationServicer_to_server, OneAtATime())],
        tls=TLSConfig(cert=pki.server_cert, key=pki.server_key),
        lifecycle=lifecycle,
        interceptors=[
            BearerAuth((TOKEN,)),
            CallScope(lifecycle, (f"/{SERVICE}/Generate",), BASE_STATUS_CODES),
        ],
    )
    await handle.set_serving([SERVICE], True)
    try:
        requests = [BenchRequest((1, 2, 3), 4) for _ in range(4)]
        settings = RunSettings(slos_ms={}, timeout_s=30, disable_progress=True)
        outcomes, _ = await bench_gateway_async(
            f"localhost:{handle.port}", requests, LoadSpec(math.inf), settings, client
        )
    finally:
        await handle.server.stop(0)
    return [o.error if not o.success else None for o in outcomes]


def test_tls_token_and_retries_reach_a_secured_gateway(pki: Pki) -> None:
    tls = TLSConfig(ca=pki.ca)
    retrying = ClientOptions(tls, TOKEN, RetryPolicy(max_attempts=200, max_delay_s=0.1))
    assert asyncio.run(_bench(pki, retrying)) == [None] * 4  # all at once, one slot: retried
    once = asyncio.run(_bench(pki, ClientOptions(tls, TOKEN, RetryPolicy(max_attempts=1))))
    refused = [e for e in once if e is not None]
    assert refused and all(e.startswith("RESOURCE_EXHAUSTED") for e in refused), once
    with pytest.raises(RuntimeError, match="UNAUTHENTICATED"):  # the warm-up is refused
        asyncio.run(_bench(pki, ClientOptions(tls, None)))


def test_bench_flags_build_the_sdk_options(pki: Pki, tmp_path: Path) -> None:
    from pdserve.bench.cli import _client_options

    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    args = build_parser().parse_args(
        [
            "bench",
            "--tls-ca",
            str(pki.ca),
            "--tls-cert",
            str(pki.client_cert),
            "--tls-key",
            str(pki.client_key),
            "--auth-token-file",
            str(token_file),
            "--retries",
            "5",
        ]
    )
    options = _client_options(args)
    assert options.tls == TLSConfig(cert=pki.client_cert, key=pki.client_key, ca=pki.ca)
    assert options.token == TOKEN
    assert options.retry.max_attempts == 6
    plain = _client_options(build_parser().parse_args(["bench"]))
    assert plain.tls is None and plain.retry.max_attempts == 4
    with pytest.raises(ValueError, match="--retries"):
        _client_options(argparse.Namespace(**{**vars(args), "retries": -1}))
