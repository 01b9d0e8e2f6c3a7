"""TLS on every gRPC hop, mutual TLS between tiers, and bearer-token auth on the public API,
over a real cluster (tiny model): handshakes that succeed and the ones that must be refused."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx2 as httpx
import openai
import pytest

from core.tls import TLSConfig, sync_channel
from pdserve.client import NO_RETRY, AsyncClient
from pdserve.local_cluster import Cluster, free_port_range, start_cluster
from protos.pdserve.v1 import worker_pb2, worker_pb2_grpc
from tests.gateway.certs import Pki, make_pki
from tests.support.tiny_models import build_tiny_model

pytestmark = pytest.mark.e2e

TOKEN = "e2e-bearer-token-0123456789"


@pytest.fixture(scope="module")
def secure(
    tmp_path_factory: pytest.TempPathFactory, cluster_logs: Path
) -> Iterator[tuple[Cluster, Pki, Path]]:
    root = tmp_path_factory.mktemp("secure")
    pki = make_pki(root / "pki")
    model = build_tiny_model(root / "tiny-qwen2", "qwen2", vocab_size=512, seed=5)
    tokens = root / "tokens"
    tokens.write_text(f"# accepted tokens\n{TOKEN}\n")
    tls = TLSConfig(cert=pki.server_cert, key=pki.server_key, ca=pki.ca)
    cluster = start_cluster(
        str(model),
        prefill=1,
        decode=1,
        log_dir=cluster_logs,
        http_port=free_port_range(1),
        extra=(
            "--tls-cert",
            str(pki.server_cert),
            "--tls-key",
            str(pki.server_key),
            "--tls-ca",
            str(pki.ca),
            "--auth-token-file",
            str(tokens),
        ),
        tls=tls,
    )
    try:
        yield cluster, pki, tokens
    finally:
        cluster.stop()


async def _generate(address: str, **client: object) -> list[int]:
    async with AsyncClient(address, retry=NO_RETRY, **client) as c:  # type: ignore[arg-type]
        return [
            t
            async for chunk in c.generate("hello", max_tokens=8, temperature=0.0, timeout=30)
            for t in chunk.token_ids
        ]


def test_tls_and_token_serve_every_hop(secure: tuple[Cluster, Pki, Path]) -> None:
    cluster, pki, _ = secure
    tokens = asyncio.run(_generate(cluster.gateway, tls=TLSConfig(ca=pki.ca), token=TOKEN))
    assert len(tokens) == 8
    for status in cluster.wait_idle():
        assert status.free_blocks == status.total_blocks, status


@pytest.mark.parametrize(
    ("client", "code"),
    [
        ({"tls": "ca", "token": None}, grpc.StatusCode.UNAUTHENTICATED),
        ({"tls": "ca", "token": "not-the-token"}, grpc.StatusCode.UNAUTHENTICATED),
        ({"tls": None, "token": TOKEN}, grpc.StatusCode.UNAVAILABLE),  # plaintext
        ({"tls": "rogue", "token": TOKEN}, grpc.StatusCode.UNAVAILABLE),  # untrusted server
    ],
    ids=["no-token", "wrong-token", "plaintext", "wrong-ca"],
)
def test_public_api_refusals(
    secure: tuple[Cluster, Pki, Path], client: dict[str, object], code: grpc.StatusCode
) -> None:
    cluster, pki, _ = secure
    tls = {"ca": TLSConfig(ca=pki.ca), "rogue": TLSConfig(ca=pki.rogue_ca), None: None}
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(_generate(cluster.gateway, tls=tls[client["tls"]], token=client["token"]))
    assert info.value.code() == code, info.value.details()


def _worker_status(address: str, tls: TLSConfig | None) -> worker_pb2.WorkerStatus:
    with sync_channel(address, tls) as channel:
        return worker_pb2_grpc.DecodeStub(channel).GetStatus(worker_pb2.StatusRequest(), timeout=5)


def test_workers_admit_only_clients_with_a_fleet_certificate(
    secure: tuple[Cluster, Pki, Path],
) -> None:
    cluster, pki, _ = secure
    [decode] = cluster.decode
    fleet_client = TLSConfig(cert=pki.client_cert, key=pki.client_key, ca=pki.ca)
    assert _worker_status(decode, fleet_client).total_blocks > 0
    refused = {
        "plaintext": None,
        "no client certificate": TLSConfig(ca=pki.ca),
        "certificate of another CA": TLSConfig(
            cert=pki.rogue_client_cert, key=pki.rogue_client_key, ca=pki.ca
        ),
    }
    for what, tls in refused.items():
        with pytest.raises(grpc.RpcError) as info:
            _worker_status(decode, tls)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, what


def test_cli_generate_with_tls_and_token(secure: tuple[Cluster, Pki, Path]) -> None:
    cluster, pki, tokens = secure
    cmd = [sys.executable, "-m", "pdserve.cli", "generate", "hello", "--max-tokens", "4"]
    cmd += ["--gateway", cluster.gateway, "--tls-ca", str(pki.ca)]
    done = subprocess.run(
        [*cmd, "--auth-token-file", str(tokens)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "completion_tokens=4" in done.stderr
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


def _openai(cluster: Cluster, ca: Path | None, token: str) -> openai.OpenAI:
    assert cluster.http is not None
    verify: ssl.SSLContext | bool = TLSConfig(ca=ca).client_ssl_context() if ca else True
    return openai.OpenAI(
        base_url=f"{cluster.http}/v1",
        api_key=token,
        max_retries=0,
        http_client=httpx.Client(verify=verify),
    )


def test_http_api_is_served_over_tls_with_the_same_token(
    secure: tuple[Cluster, Pki, Path],
) -> None:
    cluster, pki, _ = secure
    assert cluster.http is not None and cluster.http.startswith("https://")
    client = _openai(cluster, pki.ca, TOKEN)
    model = client.models.list().data[0].id
    reply = client.completions.create(model=model, prompt="hello", max_tokens=4, temperature=0)
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    with pytest.raises(openai.AuthenticationError):
        _openai(cluster, pki.ca, "not-the-token").models.list()
    with pytest.raises(openai.APIConnectionError):  # a server the client's CA did not sign
        _openai(cluster, pki.rogue_ca, TOKEN).models.list()
    plain = cluster.http.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):  # no plaintext beside TLS
        httpx.get(f"{plain}/health", timeout=5)
