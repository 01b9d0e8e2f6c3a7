"""The fleet end to end: two prefill and two decode workers (tiny model) behind one gateway, real
processes on loopback. Workers are added, drained and killed (-9) while requests run; every
request must complete elsewhere with the output an undisturbed run gives, or end UNAVAILABLE.
After each test every live pool is back to idle.

Tests run in file order on one cluster; the destructive ones come last."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import grpc
import pytest

from pdserve.client import NO_RETRY, AsyncClient, RetryPolicy
from pdserve.local_cluster import Cluster, free_port_range, start_cluster
from pdserve.rich_errors import retry_after_of
from tests.support.tiny_models import build_tiny_model

pytestmark = pytest.mark.e2e

MAX_CONCURRENT = 20
MAX_PROMPT_TOKENS = 900


@dataclass
class Fleet:
    cluster: Cluster
    model: Path
    spare_decode: str
    spare_kv_port: int
    dead: set[str] = field(default_factory=set)

    def live(self) -> None:
        """Forget dead workers (for wait_idle)."""
        self.cluster.prefill = [a for a in self.cluster.prefill if a not in self.dead]
        self.cluster.decode = [a for a in self.cluster.decode if a not in self.dead]

    def assert_idle(self) -> None:
        self.live()
        for status in self.cluster.wait_idle(timeout_s=20):
            assert status.free_blocks == status.total_blocks, status
            assert status.running == 0 and status.waiting == 0, status
            assert status.pending_transfers == 0 and status.pool_ok, status

    def requests_on(self, address: str) -> int:
        return self.cluster.status_of(address).requests_total


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, cluster_logs: Path) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    model = build_tiny_model(root / "tiny-llama", "llama", vocab_size=512, seed=3)
    key = root / "kv.key"
    key.write_text("fleet-test-key-0123456789abcdef")
    spare = free_port_range(2)
    cluster = start_cluster(
        str(model),
        prefill=2,
        decode=2,
        log_dir=cluster_logs,
        extra=(
            "--kv-key-file",
            str(key),
            "--keep-going",
            "--also-decode",
            f"127.0.0.1:{spare}",
            "--max-concurrent-requests",
            str(MAX_CONCURRENT),
            "--max-queued-requests",
            "0",
            "--max-prompt-tokens",
            str(MAX_PROMPT_TOKENS),
            "--shutdown-grace",
            "30",
        ),
    )
    try:
        yield Fleet(cluster, model, f"127.0.0.1:{spare}", spare + 1)
    finally:
        cluster.stop()


def _prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(length)]


@dataclass
class Outcome:
    tokens: list[int]
    finish: str | None = None
    error: grpc.StatusCode | None = None
    details: str = ""


async def _stream(
    client: AsyncClient,
    prompt: list[int],
    max_tokens: int,
    progress: list[int] | None = None,
    timeout: float = 120,
) -> Outcome:
    out = Outcome([])
    try:
        async for chunk in client.generate(
            prompt_token_ids=prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=True,
            timeout=timeout,
        ):
            out.tokens.extend(chunk.token_ids)
            if progress is not None:
                progress.append(len(chunk.token_ids))
            out.finish = chunk.finish_reason
    except grpc.aio.AioRpcError as exc:
        out.error, out.details = exc.code(), exc.details() or ""
    return out


async def _run_all(gateway: str, prompts: list[list[int]], max_tokens: int) -> list[Outcome]:
    async with AsyncClient(gateway) as client:
        return list(await asyncio.gather(*[_stream(client, p, max_tokens) for p in prompts]))


async def _wait_for(
    predicate: Callable[[], bool], timeout_s: float = 30.0, poll_s: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(poll_s)


def _noticed_after(cluster: Cluster, address: str, killed_at: float) -> float:
    """Seconds from ``killed_at`` (wall clock) to the gateway's log line marking ``address``
    down (the moment it stops routing to it)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in cluster.log_path.read_text(errors="replace").splitlines():
            if '"worker_down"' not in line or address not in line:
                continue
            event = json.loads(line)
            at = datetime.fromisoformat(event["timestamp"]).timestamp()
            if event["address"] == address and at >= killed_at - 0.5:
                return at - killed_at
        time.sleep(0.1)
    raise AssertionError(f"the gateway never marked {address} down")


def test_requests_spread_over_every_worker(fleet: Fleet) -> None:
    cluster = fleet.cluster
    before = {a: fleet.requests_on(a) for a in [*cluster.prefill, *cluster.decode]}
    prompts = [_prompt(i, 80) for i in range(8)]
    results = asyncio.run(_run_all(cluster.gateway, prompts, 16))
    assert all(r.error is None and len(r.tokens) == 16 for r in results), results
    for address, count in before.items():
        assert fleet.requests_on(address) > count, f"{address} got no work"
    fleet.assert_idle()


def test_long_prompt_refused_with_a_clear_message(fleet: Fleet) -> None:
    results = asyncio.run(_run_all(fleet.cluster.gateway, [_prompt(1, MAX_PROMPT_TOKENS + 1)], 4))
    assert results[0].error == grpc.StatusCode.INVALID_ARGUMENT
    assert "--max-prompt-tokens" in results[0].details


def test_cancel_before_and_after_first_token_and_deadline_free_every_block(fleet: Fleet) -> None:
    gateway = fleet.cluster.gateway

    async def cancel_early(delay_s: float) -> None:
        async with AsyncClient(gateway) as client:
            task = asyncio.create_task(_stream(client, _prompt(7, 700), 300))
            await asyncio.sleep(delay_s)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    async def cancel_after_first() -> None:
        async with AsyncClient(gateway) as client:
            async for _ in client.generate(
                prompt_token_ids=_prompt(8, 300), max_tokens=600, ignore_eos=True
            ):
                break

    asyncio.run(cancel_early(0.0))
    asyncio.run(cancel_early(0.02))
    asyncio.run(cancel_after_first())
    results = asyncio.run(_deadline(gateway))
    assert results.error == grpc.StatusCode.DEADLINE_EXCEEDED, results
    fleet.assert_idle()


async def _deadline(gateway: str) -> Outcome:
    async with AsyncClient(gateway) as client:
        return await _stream(client, _prompt(9, 200), 800, timeout=0.5)


def test_overload_is_refused_with_retry_info_and_the_sdk_retries(fleet: Fleet) -> None:
    prompts = [_prompt(100 + i, 40) for i in range(MAX_CONCURRENT + 12)]

    async def run(retry: RetryPolicy) -> tuple[list[Outcome], list[float | None]]:
        hints: list[float | None] = []
        async with AsyncClient(fleet.cluster.gateway, retry=retry) as client:

            async def one(prompt: list[int]) -> Outcome:
                try:
                    chunks = [
                        c
                        async for c in client.generate(
                            prompt_token_ids=prompt, max_tokens=200, ignore_eos=True, timeout=120
                        )
                    ]
                except grpc.aio.AioRpcError as exc:
                    hints.append(retry_after_of(exc))
                    return Outcome([], error=exc.code(), details=exc.details() or "")
                return Outcome([t for c in chunks for t in c.token_ids], chunks[-1].finish_reason)

            return list(await asyncio.gather(*[one(p) for p in prompts])), hints

    refused, hints = asyncio.run(run(NO_RETRY))
    codes = {r.error for r in refused}
    assert codes <= {None, grpc.StatusCode.RESOURCE_EXHAUSTED}, refused
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert hints and all(h is not None and h > 0 for h in hints), hints
    assert "capacity" in next(r.details for r in refused if r.error is not None)
    retried, _ = asyncio.run(run(RetryPolicy(max_attempts=50, max_delay_s=1.0)))
    assert all(r.error is None and len(r.tokens) == 200 for r in retried), retried
    fleet.assert_idle()


def _spare_argv(fleet: Fleet) -> list[str]:
    """decode-0's command line, moved to the spare address."""
    argv = list(fleet.cluster.children()["decode-0"].argv)
    new = {
        "--listen": fleet.spare_decode,
        "--kv-bind": f"tcp://127.0.0.1:{fleet.spare_kv_port}",
        "--metrics-port": "0",
        "--shutdown-grace": "30",
    }
    for flag, value in new.items():
        argv[argv.index(flag) + 1] = value
    return argv


def test_scale_up_then_drain(fleet: Fleet) -> None:
    cluster = fleet.cluster
    spare = cluster.spawn(_spare_argv(fleet), "spare-decode")
    cluster.wait_serving(fleet.spare_decode)
    cluster.decode.append(fleet.spare_decode)

    async def scale_up() -> None:
        # the new worker is the least loaded: it gets work within seconds, no restart
        async with AsyncClient(cluster.gateway) as client:
            deadline = time.monotonic() + 20
            while fleet.requests_on(fleet.spare_decode) == 0:
                assert time.monotonic() < deadline, "the new worker got no work"
                result = await _stream(client, _prompt(200, 30), 4)
                assert result.error is None, result

    asyncio.run(scale_up())

    async def drain() -> tuple[list[Outcome], list[Outcome], int, int]:
        prompts = [_prompt(300 + i, 50) for i in range(6)]
        async with AsyncClient(cluster.gateway) as client:
            long = [asyncio.create_task(_stream(client, p, 700)) for p in prompts]
            await _wait_for(lambda: cluster.status_of(fleet.spare_decode).in_flight > 0)
            spare.send_signal(signal.SIGTERM)
            await _wait_for(lambda: not cluster.status_of(fleet.spare_decode).serving)
            on_spare = fleet.requests_on(fleet.spare_decode)
            during = await asyncio.gather(*[_stream(client, p, 8) for p in prompts])
            after = fleet.requests_on(fleet.spare_decode)
            return list(await asyncio.gather(*long)), list(during), on_spare, after

    long, during, before, after = asyncio.run(drain())
    assert all(r.error is None and len(r.tokens) == 700 for r in long), long
    assert all(r.error is None and len(r.tokens) == 8 for r in during), during
    assert after == before, "a draining worker got new work"
    assert spare.wait(timeout=60) == 0
    fleet.dead.add(fleet.spare_decode)
    fleet.assert_idle()


def test_kill_prefill_with_requests_queued(fleet: Fleet) -> None:
    cluster = fleet.cluster
    prompts = [_prompt(400 + i, 600) for i in range(10)]
    expected = asyncio.run(_run_all(cluster.gateway, prompts, 6))
    assert all(r.error is None for r in expected), expected
    victim = cluster.prefill[0]
    name = "prefill-0"
    killed_at = [0.0]

    async def run() -> list[Outcome]:
        async with AsyncClient(cluster.gateway) as client:
            tasks = [asyncio.create_task(_stream(client, p, 6)) for p in prompts]
            # kill it while it holds work (load-aware routing may give it only one prompt)
            await _wait_for(lambda: cluster.status_of(victim).in_flight >= 1, poll_s=0.005)
            killed_at[0] = time.time()
            cluster.kill(name)
            return list(await asyncio.gather(*tasks))

    results = asyncio.run(run())
    fleet.dead.add(victim)
    for got, want in zip(results, expected, strict=True):
        assert got.error is None, got
        assert got.tokens == want.tokens
    after = _noticed_after(cluster, victim, killed_at[0])
    print(f"\nprefill kill: gateway routed around the dead worker {after:.3f} s after the kill")
    fleet.assert_idle()


def test_kill_decode_with_streams_running(fleet: Fleet) -> None:
    cluster = fleet.cluster
    prompts = [_prompt(500 + i, 60) for i in range(16)]
    max_tokens = 400
    expected = asyncio.run(_run_all(cluster.gateway, prompts, max_tokens))
    assert all(r.error is None for r in expected), expected
    victim = cluster.decode[0]
    time.sleep(1.0)  # fresh load reports: the streams spread over both workers

    killed_at = [0.0]

    async def run() -> list[Outcome]:
        progress: list[list[int]] = [[] for _ in prompts]
        async with AsyncClient(cluster.gateway) as client:
            tasks = [
                asyncio.create_task(_stream(client, p, max_tokens, progress[i]))
                for i, p in enumerate(prompts)
            ]
            await _wait_for(lambda: all(sum(p) >= 4 for p in progress), poll_s=0.005)
            killed_at[0] = time.time()
            cluster.kill("decode-0")
            return list(await asyncio.gather(*tasks))

    results = asyncio.run(run())
    fleet.dead.add(victim)
    survived = 0
    for got, want in zip(results, expected, strict=True):
        if got.error is None:
            assert got.tokens == want.tokens  # resumed: no duplicated, no missing tokens
            survived += 1
        else:
            assert got.error == grpc.StatusCode.UNAVAILABLE, got
            assert got.tokens == want.tokens[: len(got.tokens)]
    resumed = sum(
        1
        for line in cluster.log_path.read_text(errors="replace").splitlines()
        if '"stream_resuming"' in line and victim in line
    )
    assert resumed > 0, "no stream ran on the killed worker"
    print(
        f"\ndecode kill: {survived}/{len(prompts)} streams survived ({resumed} were resumed from "
        f"the dead worker); gateway routed around it "
        f"{_noticed_after(cluster, victim, killed_at[0]):.3f} s after the kill"
    )
    assert survived == len(prompts)  # the other decode worker can take every stream
    fleet.assert_idle()
