"""Debian's nginx as a real proxy (HTTP/2 gRPC and HTTP/1.1) in front of a real pdserve cluster.

nginx runs ``deploy/nginx/pdserve-grpc.conf`` (the shipped snippet, ports filled in) from a
temporary prefix on loopback; the cluster is gateway (with its OpenAI-compatible HTTP API) +
1 prefill + 1 decode worker on a tiny random model. Through the proxy: a streamed Generate, a
deadline, a cancel that frees every KV block, INVALID_ARGUMENT with its message intact, and
gRPC health checks; then the HTTP API: a chat completion, the same streamed as server-sent
events (arriving while the generation runs, ending with ``data: [DONE]``), a client that
disconnects mid-stream (every block freed), /v1/models, /tokenize and /detokenize, /health.
Afterwards each tier's /metrics is scraped: every metric the dashboard and the KEDA triggers
use must be there, on the tier they expect it from, with the labels the dashboard reads.

nginx missing: skipped on a developer machine, a failure in CI (``.ci/run`` installs it).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx2 as httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from pdserve.client import AsyncClient, Chunk, Client
from pdserve.local_cluster import Cluster, free_port_range, start_cluster
from protos.pdserve.v1 import worker_pb2
from tests.deploy.manifests import OVERLAYS, ROOT, TIERS, by_kind, render_overlay
from tests.deploy.metrics_contract import (
    GATEWAY_ONLY,
    GPU_DEVICE_METRICS,
    METRICS,
    WORKER_ONLY,
    metric_of,
    series_names,
)
from tests.support.tiny_models import build_tiny_model

pytestmark = pytest.mark.e2e

NGINX_SNIPPET = ROOT / "deploy" / "nginx" / "pdserve-grpc.conf"
NGINX_READY_TIMEOUT_S = 20.0
LONG_GENERATION = 900  # tokens: ~1 ms each on the tiny model at best, so longer than 0.3 s


def _find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


@dataclass
class Nginx:
    address: str
    """gRPC (HTTP/2, prior knowledge) listener, host:port."""
    http: str
    """HTTP/1.1 listener for the OpenAI-compatible API, as a base URL."""
    proc: subprocess.Popen[bytes]
    error_log: Path

    def errors(self) -> str:
        return self.error_log.read_text(errors="replace")[-4000:] if self.error_log.exists() else ""


def _nginx_conf(
    prefix: Path, listen: str, http_listen: str, gateway: str, gateway_http: str
) -> Path:
    """A whole nginx.conf: everything under ``prefix``, in the foreground, plus the snippet."""
    snippet = NGINX_SNIPPET.read_text()
    for placeholder, value in (
        ("@HTTP_LISTEN@", http_listen),
        ("@LISTEN@", listen),
        ("@GATEWAY_HTTP@", gateway_http),
        ("@GATEWAY@", gateway),
    ):
        assert placeholder in snippet, f"{placeholder} missing from the nginx snippet"
        snippet = snippet.replace(placeholder, value)
    assert "@" not in snippet.replace("$", ""), "unfilled placeholder in the nginx snippet"
    (prefix / "pdserve-grpc.conf").write_text(snippet)
    # As root, workers would run as nobody and could not reach the private temp folder.
    user = "user root;" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""
daemon off;
worker_processes 1;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/pdserve-grpc.conf;
}}
"""
    )
    return conf


def _health(address: str, service: str = "", timeout: float = 2.0) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    return int(reply.status)


@pytest.fixture(scope="module")
def nginx_binary() -> str:
    found = _find_nginx()
    if found is None:
        message = "nginx is not installed (apt-get install -y nginx-light; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def metrics_ports() -> dict[str, int]:
    """Where each tier serves /metrics (``up`` puts workers after the gateway)."""
    base = free_port_range(3)
    return {"gateway": base, "prefill": base + 1, "decode": base + 2}


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, metrics_ports: dict[str, int]
) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("nginx-cluster")
    model = build_tiny_model(work / "tiny-llama", "llama", vocab_size=512, seed=3)
    extra = ("--metrics-base-port", str(metrics_ports["gateway"]))
    started = start_cluster(
        str(model),
        prefill=1,
        decode=1,
        log_dir=work,
        extra=extra,
        http_port=free_port_range(1),
    )
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def nginx(
    nginx_binary: str, cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Nginx]:
    prefix = tmp_path_factory.mktemp("nginx")
    address = f"127.0.0.1:{free_port_range(1)}"
    http_address = f"127.0.0.1:{free_port_range(1)}"
    assert cluster.http, "the cluster's HTTP API is off"
    gateway_http = cluster.http.removeprefix("http://")
    conf = _nginx_conf(prefix, address, http_address, cluster.gateway, gateway_http)
    error_log = prefix / "error.log"
    proc = subprocess.Popen(
        [nginx_binary, "-p", str(prefix), "-c", str(conf), "-e", str(error_log)],
        stdout=subprocess.DEVNULL,
        stderr=(prefix / "stderr.log").open("wb"),
    )
    server = Nginx(address, f"http://{http_address}", proc, error_log)
    try:
        deadline = time.monotonic() + NGINX_READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                stderr = (prefix / "stderr.log").read_text(errors="replace")
                pytest.fail(f"nginx exited with {proc.returncode}:\n{stderr}\n{server.errors()}")
            try:
                if (
                    _health(address) == health_pb2.HealthCheckResponse.SERVING
                    and httpx.get(f"{server.http}/health", timeout=2.0).status_code == 200
                ):
                    break
            except (grpc.RpcError, httpx.HTTPError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"nginx not proxying after {NGINX_READY_TIMEOUT_S}s:\n{server.errors()}"
                )
            time.sleep(0.2)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)  # fast shutdown of the master and its worker
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _assert_idle(cluster: Cluster) -> None:
    statuses = cluster.wait_idle(timeout_s=15.0)
    for status in statuses:
        assert status.free_blocks == status.total_blocks, status
        assert (status.running, status.waiting, status.pending_transfers) == (0, 0, 0), status
        assert status.pool_ok, status


def _collect(address: str, prompt: str, max_tokens: int) -> list[Chunk]:
    with Client(address) as client:
        return list(
            client.generate(
                prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, timeout=60
            )
        )


def test_streamed_generate_through_nginx(nginx: Nginx, cluster: Cluster) -> None:
    chunks = _collect(nginx.address, "Streams pass through nginx", 12)
    assert len(chunks) >= 2, "expected a stream of several messages"
    assert all(c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == "length"
    tokens = [t for c in chunks for t in c.token_ids]
    assert len(tokens) == last.completion_tokens == 12
    assert len({c.request_id for c in chunks}) == 1
    # Greedy decoding is deterministic: the proxy must not change a byte.
    direct = _collect(cluster.gateway, "Streams pass through nginx", 12)
    assert tokens == [t for c in direct for t in c.token_ids]
    assert "".join(c.text for c in chunks) == "".join(c.text for c in direct)


def test_concurrent_streams_share_one_proxied_connection(nginx: Nginx) -> None:
    async def run() -> list[list[Chunk]]:
        async with AsyncClient(nginx.address) as client:

            async def one(i: int) -> list[Chunk]:
                stream = client.generate(
                    f"stream {i}", max_tokens=8 + i, temperature=0.0, ignore_eos=True, timeout=60
                )
                return [chunk async for chunk in stream]

            return await asyncio.gather(*(one(i) for i in range(4)))

    for i, chunks in enumerate(asyncio.run(run())):
        assert chunks[-1].finish_reason == "length"
        assert sum(len(c.token_ids) for c in chunks) == chunks[-1].completion_tokens == 8 + i


def test_deadline_exceeded_through_nginx(nginx: Nginx, cluster: Cluster) -> None:
    received = 0
    with Client(nginx.address) as client, pytest.raises(grpc.RpcError) as caught:
        for _chunk in client.generate(
            "A deadline",
            max_tokens=LONG_GENERATION,
            temperature=0.0,
            ignore_eos=True,
            timeout=0.3,
        ):
            received += 1
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value
    assert received < LONG_GENERATION
    _assert_idle(cluster)


def test_cancel_through_nginx_frees_every_block(nginx: Nginx, cluster: Cluster) -> None:
    busy: list[worker_pb2.WorkerStatus] = []

    async def cancel_mid_stream() -> int:
        received = 0
        async with AsyncClient(nginx.address) as client:
            stream = client.generate(
                "Cancel me", max_tokens=LONG_GENERATION, temperature=0.0, ignore_eos=True
            )
            async for _chunk in stream:
                received += 1
                if received == 3:
                    busy.extend(await asyncio.to_thread(cluster.worker_status))
                    break
            await stream.aclose()  # cancels the call: nginx resets the stream upstream
        return received

    assert asyncio.run(cancel_mid_stream()) == 3
    decode = [s for s in busy if s.tier == "decode"]
    assert decode and any(s.free_blocks < s.total_blocks for s in decode), (
        f"the stream held no KV blocks mid-generation, so the idle check proves nothing: {busy}"
    )
    _assert_idle(cluster)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"prompt": "hi", "temperature": -1.0}, "temperature must be >= 0"),
        ({"messages": [("wizard🧙", "hi")]}, "unknown role 'wizard🧙'"),
    ],
    ids=["temperature", "non-ascii-message"],
)
def test_invalid_argument_message_intact(
    nginx: Nginx, cluster: Cluster, options: dict[str, object], expected: str
) -> None:
    def error_from(address: str) -> grpc.RpcError:
        with Client(address) as client, pytest.raises(grpc.RpcError) as caught:
            list(client.generate(timeout=30, **options))  # type: ignore[arg-type]
        return caught.value

    proxied, direct = error_from(nginx.address), error_from(cluster.gateway)
    assert proxied.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in proxied.details()
    assert proxied.details() == direct.details()


def test_health_check_through_nginx(nginx: Nginx) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    assert _health(nginx.address) == serving
    assert _health(nginx.address, "pdserve.v1.Generation") == serving
    with pytest.raises(grpc.RpcError) as caught:
        _health(nginx.address, "no.such.Service")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# --------------------------------------------------------------------------------------------
# The OpenAI-compatible HTTP API through nginx (HTTP/1.1, unbuffered)
# --------------------------------------------------------------------------------------------


def _model_id(base: str) -> str:
    reply = httpx.get(f"{base}/v1/models", timeout=10)
    assert reply.status_code == 200, reply.text
    (card,) = reply.json()["data"]
    return str(card["id"])


def _chat(base: str, content: str, max_tokens: int, **extra: object) -> httpx.Response:
    body = {
        "model": _model_id(base),
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)


def _events(lines: Iterator[str]) -> Iterator[str]:
    """The ``data:`` payloads of a server-sent event stream, in order."""
    for line in lines:
        if line.startswith("data:"):
            yield line.removeprefix("data:").strip()
        else:
            assert line == "" or line.startswith(":"), f"not an SSE line: {line!r}"


def test_http_location_streams_unbuffered_over_http_1_1() -> None:
    """What SSE needs from the snippet's HTTP location (the e2e tests below prove it works)."""
    snippet = NGINX_SNIPPET.read_text()
    location = snippet[snippet.index("location ~") :]
    location = location[: location.index("}")]
    directives = {ln.strip().rstrip(";") for ln in location.splitlines()}
    assert "proxy_buffering off" in directives
    assert "proxy_http_version 1.1" in directives
    assert 'proxy_set_header Connection ""' in directives
    assert "proxy_pass http://pdserve_gateway_http" in directives


def test_chat_completion_through_nginx(nginx: Nginx, cluster: Cluster) -> None:
    assert cluster.http
    proxied = _chat(nginx.http, "Chat through nginx", 10, seed=7)
    assert proxied.status_code == 200, proxied.text
    assert proxied.headers["content-type"].startswith("application/json")
    assert proxied.headers.get("x-request-id")
    body = proxied.json()
    assert body["object"] == "chat.completion"
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 10
    # Greedy decoding: the proxy must not change a byte.
    direct = _chat(cluster.http, "Chat through nginx", 10, seed=7).json()
    assert choice["message"]["content"] == direct["choices"][0]["message"]["content"]


def test_streamed_chat_completion_through_nginx(nginx: Nginx, cluster: Cluster) -> None:
    assert cluster.http
    body = {
        "model": _model_id(nginx.http),
        "messages": [{"role": "user", "content": "Stream through nginx"}],
        "max_tokens": 12,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{nginx.http}/v1/chat/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = list(_events(reply.iter_lines()))
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content) >= 2, "expected the text in several events"
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "length" and not any(finish[:-1])
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    text = "".join(c["choices"][0]["delta"]["content"] for c in content)
    direct = _chat(cluster.http, "Stream through nginx", 12).json()
    assert text == direct["choices"][0]["message"]["content"]


def test_sse_events_arrive_while_generating_and_a_disconnect_frees_every_block(
    nginx: Nginx, cluster: Cluster
) -> None:
    """The first events reach the client while the decode worker is still generating; closing
    the connection then cancels the request through nginx on every tier. (nginx forwards a
    fast reader's data promptly even with buffering on, so this cannot tell the two apart:
    the static check above pins ``proxy_buffering off``, which keeps nginx from reading a
    stream ahead of a slow client into buffers and temp files.)"""
    body = {
        "model": _model_id(nginx.http),
        "prompt": "Stream and hang up",
        "max_tokens": LONG_GENERATION,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    busy: list[worker_pb2.WorkerStatus] = []
    received = 0
    with httpx.stream("POST", f"{nginx.http}/v1/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        for payload in _events(reply.iter_lines()):
            assert payload != "[DONE]", "the whole generation arrived before the first event"
            received += 1
            if received == 3:
                busy.extend(cluster.worker_status())
                break
    assert received == 3
    decode = [s for s in busy if s.tier == "decode"]
    assert decode and any(s.running and s.free_blocks < s.total_blocks for s in decode), (
        f"no generation running while its first events arrived: {busy}"
    )
    _assert_idle(cluster)


def test_models_tokenize_and_health_through_nginx(nginx: Nginx, cluster: Cluster) -> None:
    assert cluster.http
    proxied = httpx.get(f"{nginx.http}/v1/models", timeout=10)
    assert proxied.status_code == 200
    direct = httpx.get(f"{cluster.http}/v1/models", timeout=10)
    assert proxied.json() == direct.json()
    assert proxied.json()["object"] == "list"
    model = _model_id(nginx.http)
    tokens = httpx.post(
        f"{nginx.http}/tokenize", json={"model": model, "prompt": "round trip"}, timeout=10
    ).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    text = httpx.post(
        f"{nginx.http}/detokenize", json={"model": model, "tokens": tokens["tokens"]}, timeout=10
    ).json()
    assert text["prompt"] == "round trip"
    health = httpx.get(f"{nginx.http}/health", timeout=5)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    # An OpenAI error object passes through with its status.
    unknown = httpx.post(
        f"{nginx.http}/v1/completions",
        json={"model": "no-such-model", "prompt": "x", "max_tokens": 1},
        timeout=10,
    )
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"]


def test_http_requests_are_counted_by_route_and_status(
    nginx: Nginx, metrics_ports: dict[str, int]
) -> None:
    """The labels the dashboard's HTTP panels group by (``route``, ``status``)."""
    assert _chat(nginx.http, "Counted", 2).status_code == 200
    with urllib.request.urlopen(
        f"http://127.0.0.1:{metrics_ports['gateway']}/metrics", timeout=10
    ) as reply:
        text = reply.read().decode()
    (family,) = (
        f for f in text_string_to_metric_families(text) if f.name == "pdserve_http_requests"
    )
    counted = {
        (sample.labels["route"], sample.labels["status"]): sample.value
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert counted[("/v1/chat/completions", "200")] >= 1, counted
    assert counted[("/v1/models", "200")] >= 1, counted
    assert {sample.labels["tier"] for sample in family.samples} == {"gateway"}


def _scrape(port: int) -> dict[str, set[str]]:
    """pdserve metric names served on ``port`` -> the ``tier`` labels of their samples."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    served: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        # prometheus_client adds a *_created timestamp gauge beside counters and histograms.
        if family.name.startswith("pdserve_") and not family.name.endswith("_created"):
            name = family.name + ("_total" if family.type == "counter" else "")
            served[name] = {sample.labels.get("tier", "") for sample in family.samples}
    return served


def test_every_tier_serves_the_metrics_deploy_relies_on(
    nginx: Nginx, metrics_ports: dict[str, int]
) -> None:
    _collect(nginx.address, "Counted by every tier", 4)
    served = {tier: _scrape(port) for tier, port in metrics_ports.items()}
    for tier, names in served.items():
        labels = set().union(*names.values())
        assert labels == {tier}, f"{tier}'s samples carry tier labels {labels}"
    everything = set().union(*(set(names) for names in served.values()))
    unknown = everything - set(METRICS)
    assert not unknown, (
        f"exported, not in tests/deploy/metrics_contract.py (add and chart them): {unknown}"
    )
    for name in set(METRICS) - GPU_DEVICE_METRICS:  # no GPU here: only pdserve_gpu_available
        where = {tier for tier, names in served.items() if name in names}
        if name in GATEWAY_ONLY:
            expected = {"gateway"}
        elif name in WORKER_ONLY:
            expected = {"prefill", "decode"}
        else:
            expected = set(TIERS)
        assert where == expected, f"{name} served by {where}, expected {expected}"
    # Every series a KEDA trigger reads comes from the tier its query names.
    for overlay in OVERLAYS:
        for scaled in by_kind(render_overlay(overlay), "ScaledObject").values():
            for trigger in scaled["spec"]["triggers"]:
                query = trigger["metadata"]["query"]
                tier = query.split('tier="', 1)[1].split('"', 1)[0]
                for series in series_names(query):
                    known = metric_of(series)
                    assert known and known[0] in served[tier], f"{series} not on {tier}: {query}"
