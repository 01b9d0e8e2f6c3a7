"""``pdserve up`` supervising real processes (a tiny model, loopback): a decode worker killed
with -9 mid-stream under plain ``pdserve up`` costs no stream, comes back on its address and is
routed to again; a worker whose port the test holds is reported at once and given up on while
the rest serve (no hang); ``--fail-fast`` stops everything on a worker's death; the gateway's
death stops the launcher with a non-zero status.

Each test starts its own small cluster (they end clusters on purpose)."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import grpc
import pytest

from pdserve.client import AsyncClient
from pdserve.local_cluster import Cluster, free_port_range, start_cluster
from tests.e2e.prometheus import sample, scrape
from tests.support.tiny_models import build_tiny_model

pytestmark = pytest.mark.e2e

FAST_RESTARTS = ("--restart-delay", "0.2", "--restart-limit", "2", "--restart-window", "60")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("supervisor") / "tiny-llama", "llama", vocab_size=512, seed=7
    )


@pytest.fixture
def started() -> Iterator[list[Cluster]]:
    """Clusters a test starts, stopped after it whatever happened."""
    clusters: list[Cluster] = []
    yield clusters
    for cluster in clusters:
        cluster.stop()


@dataclass
class Outcome:
    tokens: list[int]
    error: grpc.StatusCode | None = None


def _prompt(seed: int, length: int = 40) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(length)]


async def _stream(
    client: AsyncClient, prompt: list[int], max_tokens: int, progress: list[int] | None = None
) -> Outcome:
    out = Outcome([])
    try:
        async for chunk in client.generate(
            prompt_token_ids=prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=True,
            timeout=120,
        ):
            out.tokens.extend(chunk.token_ids)
            if progress is not None:
                progress.append(len(chunk.token_ids))
    except grpc.aio.AioRpcError as exc:
        out.error = exc.code()
    return out


def _run(gateway: str, prompts: list[list[int]], max_tokens: int) -> list[Outcome]:
    async def run() -> list[Outcome]:
        async with AsyncClient(gateway) as client:
            return list(await asyncio.gather(*[_stream(client, p, max_tokens) for p in prompts]))

    return asyncio.run(run())


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # a zombie is gone too


def _at(record: dict[str, object]) -> float:
    return datetime.fromisoformat(str(record["timestamp"])).timestamp()


def _wait_gateway_serving(cluster: Cluster, address: str, after: float) -> None:
    """Until the gateway logs ``address`` SERVING (again) later than ``after``."""
    deadline = time.monotonic() + 30
    while not any(
        e.get("address") == address and _at(e) > after for e in cluster.events("worker_serving")
    ):
        assert time.monotonic() < deadline, f"the gateway never took {address} back"
        time.sleep(0.1)


def test_a_decode_worker_killed_mid_stream_is_restarted_and_served_again(
    tiny_model: Path, cluster_logs: Path, started: list[Cluster]
) -> None:
    metrics = free_port_range(5)  # gateway, prefill-0, decode-0, decode-1, the launcher
    cluster = start_cluster(
        str(tiny_model),
        prefill=1,
        decode=2,
        log_dir=cluster_logs,
        extra=("--metrics-base-port", str(metrics)),
    )
    started.append(cluster)
    prompts = [_prompt(i) for i in range(8)]
    max_tokens = 300
    expected = _run(cluster.gateway, prompts, max_tokens)
    assert all(r.error is None for r in expected), expected
    victim = cluster.children()["decode-1"]
    time.sleep(1.0)  # fresh load reports: the streams spread over both decode workers

    async def kill_mid_stream() -> list[Outcome]:
        progress: list[list[int]] = [[] for _ in prompts]
        async with AsyncClient(cluster.gateway) as client:
            tasks = [
                asyncio.create_task(_stream(client, p, max_tokens, progress[i]))
                for i, p in enumerate(prompts)
            ]
            deadline = time.monotonic() + 60
            while not all(sum(p) >= 4 for p in progress):
                assert time.monotonic() < deadline, "the streams did not start"
                await asyncio.sleep(0.005)
            assert cluster.status_of(victim.address).running > 0, "nothing ran on the victim"
            cluster.kill("decode-1")
            return list(await asyncio.gather(*tasks))

    results = asyncio.run(kill_mid_stream())
    for got, want in zip(results, expected, strict=True):
        assert got.error is None, got.error  # resumed on decode-0: nothing lost
        assert got.tokens == want.tokens
    assert cluster.proc.poll() is None, "the launcher stopped:\n" + cluster.logs()
    back = cluster.wait_child(
        "decode-1", lambda c: c.state == "serving" and c.pid != victim.pid, timeout_s=90
    )
    assert back.restarts == 1 and back.address == victim.address
    exited = cluster.wait_event("worker_exited", worker="decode-1")
    assert (exited["reason"], exited["pid"]) == ("SIGKILL", victim.pid)
    restarted = cluster.wait_event("worker_restarted", worker="decode-1", pid=back.pid)
    # the gateway follows the worker's streams again and routes to it
    _wait_gateway_serving(cluster, victim.address, after=_at(restarted))
    served = 0
    for _ in range(5):
        assert all(r.error is None for r in _run(cluster.gateway, prompts, 8))
        served = cluster.status_of(victim.address).requests_total
        if served:
            break
    assert served > 0, "the gateway never routed to the restarted worker"
    launcher = scrape(metrics + 4)
    assert sample(launcher, "pdserve_worker_restarts_total", worker="decode-1") == 1
    assert sample(launcher, "pdserve_worker_exits_total", worker="decode-1", reason="SIGKILL") == 1
    assert sample(launcher, "pdserve_worker_up", worker="decode-1") == 1
    statuses = cluster.wait_idle(timeout_s=20)
    assert all(s.free_blocks == s.total_blocks and s.pool_ok for s in statuses), statuses


@pytest.mark.parametrize("mode", ["supervised", "keep-going"])
def test_a_held_worker_port_is_reported_at_once_and_the_rest_serve(
    mode: str, tiny_model: Path, cluster_logs: Path, started: list[Cluster]
) -> None:
    base = free_port_range(2)  # decode-0, decode-1
    held = socket.socket()  # what an outgoing connection holding the port looks like to bind
    held.bind(("127.0.0.1", base + 1))
    held.listen()
    try:
        cluster = start_cluster(
            str(tiny_model),
            prefill=0,
            decode=2,
            log_dir=cluster_logs,
            extra=FAST_RESTARTS if mode == "supervised" else ("--keep-going",),
            worker_base_port=base,
            skip_wait={f"127.0.0.1:{base + 1}"},
        )
        started.append(cluster)
        reported = cluster.wait_event("worker_port_unavailable", worker="decode-1", timeout_s=5)
        assert reported["port"] == base + 1 and "in use" in str(reported["error"])
        launched = cluster.wait_event("process_started", worker="gateway")
        assert _at(reported) - _at(launched) < 2.0, "not reported at once"
        gave_up = cluster.wait_event("worker_gave_up", worker="decode-1", timeout_s=10)
        assert gave_up["restarts"] == (2 if mode == "supervised" else 0)
        ready = cluster.wait_event("cluster_ready", timeout_s=30)
        assert ready["gave_up"] == ["decode-1"]
        assert cluster.children()["decode-1"].pid == 0  # never started on a taken port
        assert all(r.error is None for r in _run(cluster.gateway, [_prompt(1)], 8))
        assert cluster.proc.poll() is None
    finally:
        held.close()


def test_fail_fast_stops_the_whole_cluster_when_a_worker_dies(
    tiny_model: Path, cluster_logs: Path, started: list[Cluster]
) -> None:
    cluster = start_cluster(
        str(tiny_model), prefill=0, decode=2, log_dir=cluster_logs, extra=("--fail-fast",)
    )
    started.append(cluster)
    pids = [c.pid for c in cluster.children().values()]
    cluster.kill("decode-1")
    assert cluster.proc.wait(timeout=60) == 1
    assert all(_gone(pid) for pid in pids)
    assert "fail-fast" in str(cluster.wait_event("cluster_failed", timeout_s=1)["error"])


def test_the_gateway_dying_stops_the_launcher_with_a_non_zero_status(
    tiny_model: Path, cluster_logs: Path, started: list[Cluster]
) -> None:
    cluster = start_cluster(str(tiny_model), prefill=0, decode=1, log_dir=cluster_logs)
    started.append(cluster)
    pids = [c.pid for c in cluster.children().values()]
    cluster.kill("gateway")
    assert cluster.proc.wait(timeout=60) == 1
    assert all(_gone(pid) for pid in pids)
    assert cluster.wait_event("gateway_exited", timeout_s=1)["reason"] == "SIGKILL"
