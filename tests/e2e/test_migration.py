"""Live KV migration end to end: a decode worker drained (SIGTERM) mid-stream moves its running
sequences, KV and all, to the other decode worker; every stream goes on from its next token.

One colocated cluster (tiny model, two decode workers) behind the gateway, real processes on
loopback. Greedy streams must equal transformers' own output and seeded sampled ones an
undisturbed run's; the gateway counts each move as migrated (not resumed by re-prefill), the
target computes none of the moved prompts, the drained worker exits long before its streams
would have ended, and no block is left taken."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from pdserve.client import AsyncClient
from pdserve.local_cluster import Cluster, free_port_range, start_cluster
from tests.e2e import reference
from tests.e2e.prometheus import sample, scrape
from tests.support.tiny_models import build_tiny_model

pytestmark = pytest.mark.e2e

PROMPT_TOKENS = 300
MAX_TOKENS = 600


def _prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(PROMPT_TOKENS)]


class Migrating:
    def __init__(self, cluster: Cluster, model: Path, metrics_port: int) -> None:
        self.cluster = cluster
        self.model = model
        self.metrics_port = metrics_port  # the gateway's; decode-i's is this + 1 + i

    def worker_metric(self, index: int, name: str) -> float:
        return sample(scrape(self.metrics_port + 1 + index), name)


@pytest.fixture(scope="module")
def migrating(tmp_path_factory: pytest.TempPathFactory, cluster_logs: Path) -> Iterator[Migrating]:
    root = tmp_path_factory.mktemp("migration")
    model = build_tiny_model(root / "tiny-llama", "llama", vocab_size=512, seed=3)
    metrics = free_port_range(3)
    cluster = start_cluster(
        str(model),
        prefill=0,
        decode=2,
        log_dir=cluster_logs,
        extra=("--shutdown-grace", "60", "--metrics-base-port", str(metrics)),
    )
    try:
        yield Migrating(cluster, model, metrics)
    finally:
        cluster.stop()


async def _stream(
    client: AsyncClient,
    prompt: list[int],
    seed: int | None,
    progress: list[int],
    max_tokens: int = MAX_TOKENS,
) -> list[int]:
    tokens: list[int] = []
    async for chunk in client.generate(
        prompt_token_ids=prompt,
        max_tokens=max_tokens,
        temperature=0.0 if seed is None else 0.9,
        seed=seed,
        ignore_eos=True,
        timeout=180,
    ):
        tokens.extend(chunk.token_ids)
        progress.append(len(chunk.token_ids))
    return tokens


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as stat:  # a zombie not yet reaped has exited too
        return stat.read().split(")")[-1].split()[0] == "Z"


PROMPTS = [_prompt(10 + i) for i in range(8)]
SEEDS: list[int | None] = [None] * 6 + [41, 42]


@pytest.fixture(scope="module")
def expected(migrating: Migrating) -> list[list[int]]:
    """transformers' greedy output for the greedy streams (ignore_eos: it goes on past EOS
    too when it has none), an undisturbed run's for the seeded ones."""
    greedy = [
        reference.greedy(migrating.model, p, MAX_TOKENS, eos_token_id=None) for p in PROMPTS[:6]
    ]

    async def undisturbed() -> list[list[int]]:
        async with AsyncClient(migrating.cluster.gateway) as client:
            runs = [_stream(client, p, s, []) for p, s in zip(PROMPTS[6:], SEEDS[6:], strict=True)]
            return list(await asyncio.gather(*runs))

    return [*greedy, *asyncio.run(undisturbed())]


def test_sigterm_moves_every_stream_with_its_kv(
    migrating: Migrating, expected: list[list[int]]
) -> None:
    cluster = migrating.cluster
    prompts, seeds = PROMPTS, SEEDS
    gateway_before = scrape(migrating.metrics_port)
    prompt_tokens_before = [
        migrating.worker_metric(i, "pdserve_prompt_tokens_total") for i in (0, 1)
    ]
    victim_pid = cluster.children()["decode-1"].pid

    async def run() -> tuple[list[list[int]], float, float, int]:
        progress: list[int] = []
        async with AsyncClient(cluster.gateway) as client:
            tasks = [
                asyncio.create_task(_stream(client, p, s, progress))
                for p, s in zip(prompts, seeds, strict=True)
            ]
            while sum(progress) < 8 * 40:  # every stream is decoding
                await asyncio.sleep(0.01)
            on_victim = cluster.status_of(cluster.decode[1]).running
            signalled = time.monotonic()
            os.kill(victim_pid, signal.SIGTERM)
            exited = None
            while not all(t.done() for t in tasks):
                if exited is None and _gone(victim_pid):
                    exited = time.monotonic() - signalled
                await asyncio.sleep(0.01)
            finished = time.monotonic() - signalled
            results = [t.result() for t in tasks]
        while exited is None:
            if _gone(victim_pid):
                exited = time.monotonic() - signalled
            await asyncio.sleep(0.01)
        return results, exited, finished, on_victim

    results, exited, finished, on_victim = asyncio.run(run())
    for i, (got, want) in enumerate(zip(results, expected, strict=True)):
        assert got == want, f"stream {i}: first difference at {_first_difference(got, want)}"
    assert on_victim >= 1, "the drained worker held no stream"
    gateway = scrape(migrating.metrics_port)

    def delta(name: str, **labels: str) -> float:
        return sample(gateway, name, **labels) - sample(gateway_before, name, **labels)

    assert delta("pdserve_migrations_total", outcome="migrated") == on_victim
    assert delta("pdserve_migrations_total", outcome="failed") == 0
    assert delta("pdserve_migration_bytes_total") > 0
    assert delta("pdserve_migration_pause_seconds_count") == on_victim
    assert delta("pdserve_decode_resumes_total", outcome="resumed") == 0  # no re-prefill
    # the target computed only the prompts routed to it at first, none of the moved ones
    target_prompts = migrating.worker_metric(0, "pdserve_prompt_tokens_total")
    assert target_prompts - prompt_tokens_before[0] == PROMPT_TOKENS * (8 - on_victim)
    assert exited < 0.5 * finished, (
        f"drained worker exited after {exited:.1f} s of {finished:.1f} s"
    )
    print(
        f"\nmigration: {on_victim} streams moved; drained worker exited {exited:.2f} s after "
        f"SIGTERM, streams finished {finished:.2f} s after it"
    )
    _wait_idle(cluster)


async def _under_fault(
    cluster: Cluster, fault: Callable[[], None]
) -> list[list[int] | grpc.StatusCode]:
    """The 8 streams, with ``fault`` applied once every one is decoding; each stream's tokens,
    or the status it ended with."""

    async def one(client: AsyncClient, prompt: list[int], seed: int | None, progress: list[int]):
        try:
            return await _stream(client, prompt, seed, progress)
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    progress: list[int] = []
    async with AsyncClient(cluster.gateway) as client:
        tasks = [
            asyncio.create_task(one(client, p, s, progress))
            for p, s in zip(PROMPTS, SEEDS, strict=True)
        ]
        while sum(progress) < 8 * 40:
            await asyncio.sleep(0.01)
        held = [cluster.status_of(a).running for a in cluster.decode]
        assert all(held), f"streams per decode worker: {held}"
        fault()
        return list(await asyncio.gather(*tasks))


def test_the_source_dying_mid_migration_resumes_every_stream_token_exact(
    migrating: Migrating, expected: list[list[int]]
) -> None:
    cluster = migrating.cluster
    _wait_idle(cluster)  # both decode workers serve again (the supervisor restarted decode-1)
    victim = cluster.children()["decode-1"].pid

    def fault() -> None:
        os.kill(victim, signal.SIGTERM)  # migrations start...
        deadline = time.monotonic() + 5
        while cluster.status_of(cluster.decode[1]).running and time.monotonic() < deadline:
            pass  # (until its sequences are parked)
        os.kill(victim, signal.SIGKILL)  # ...and the source dies under them

    results = asyncio.run(_under_fault(cluster, fault))
    for i, (got, want) in enumerate(zip(results, expected, strict=True)):
        assert got == want, f"stream {i}: {got if isinstance(got, grpc.StatusCode) else 'differs'}"
    _wait_idle(cluster)


def test_the_target_dying_mid_migration_ends_each_stream_exact_or_cleanly(
    migrating: Migrating, expected: list[list[int]]
) -> None:
    cluster = migrating.cluster
    _wait_idle(cluster)
    source, target = cluster.children()["decode-1"].pid, cluster.children()["decode-0"].pid

    def fault() -> None:
        os.kill(source, signal.SIGTERM)
        os.kill(target, signal.SIGKILL)  # the only worker that could take the streams

    results = asyncio.run(_under_fault(cluster, fault))
    for i, (got, want) in enumerate(zip(results, expected, strict=True)):
        if isinstance(got, grpc.StatusCode):  # no worker left to resume on: a clean status
            assert got == grpc.StatusCode.UNAVAILABLE, f"stream {i}: {got}"
        else:
            assert got == want, f"stream {i} differs"
    _wait_idle(cluster)


def _wait_idle(cluster: Cluster) -> None:
    """Every decode worker serves, is routed to again by the gateway, and has every block
    free."""
    for address in cluster.decode:
        cluster.wait_serving(address)

    async def routed() -> None:
        async with AsyncClient(cluster.gateway) as client:
            for address in cluster.decode:
                before = cluster.status_of(address).requests_total
                deadline = time.monotonic() + 30
                while cluster.status_of(address).requests_total == before:
                    assert time.monotonic() < deadline, f"the gateway routes nothing to {address}"
                    await asyncio.gather(
                        *[_stream(client, _prompt(1), None, [], 2) for _ in range(4)]
                    )

    asyncio.run(routed())
    for status in cluster.wait_idle(timeout_s=30):
        assert status.free_blocks == status.total_blocks, status
        assert status.running == 0 and status.waiting == 0 and status.pool_ok, status


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
        None if len(a) == len(b) else min(len(a), len(b)),
    )
