"""The fleet end to end: two prefill and two decode workers (tiny model) behind one gateway, real
processes on loopback. Workers are added, drained and killed (-9) while requests run; every
request must complete elsewhere with the output an undisturbed run gives (greedy, or sampled
with a seed), or end UNAVAILABLE; the gateway's /metrics count the retries, resumes and
routing fallbacks.
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
import jsonschema
import pytest
from transformers import AutoTokenizer

from core.rich_errors import retry_after_of
from core.structured_output import GrammarKind, StructuredOutput
from pdserve.client import NO_RETRY, AsyncClient, RetryPolicy
from pdserve.local_cluster import Cluster, free_port_range, start_cluster
from tests.e2e.prometheus import Samples, sample, scrape
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
    metrics_port: int
    """The gateway's; prefill-i's is this + 1 + i."""
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

    def gateway_metrics(self) -> Samples:
        return scrape(self.metrics_port)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, cluster_logs: Path) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    model = build_tiny_model(root / "tiny-llama", "llama", vocab_size=512, seed=3)
    key = root / "kv.key"
    key.write_text("fleet-test-key-0123456789abcdef")
    spare = free_port_range(2)
    metrics = free_port_range(5)
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
            "--metrics-base-port",
            str(metrics),
        ),
    )
    try:
        yield Fleet(cluster, model, f"127.0.0.1:{spare}", spare + 1, metrics)
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
    temperature: float = 0.0,
    seed: int | None = None,
    structured: StructuredOutput | None = None,
    request_id: str = "",
) -> Outcome:
    out = Outcome([])
    try:
        async for chunk in client.generate(
            prompt_token_ids=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            ignore_eos=True,
            timeout=timeout,
            structured_output=structured,
            request_id=request_id,
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


def test_a_shared_prefix_goes_to_the_prefill_worker_that_cached_it(fleet: Fleet) -> None:
    cluster = fleet.cluster
    prefix = _prompt(50, 512)  # 32 blocks of 16 tokens
    picks = ("pdserve_router_prefill_picks_total", "worker_prefix_cache")
    before = {a: fleet.requests_on(a) for a in cluster.prefill}
    first = asyncio.run(_run_all(cluster.gateway, [[*prefix, *_prompt(51, 20)]], 4))
    assert first[0].error is None, first
    [holder] = [a for a in cluster.prefill if fleet.requests_on(a) > before[a]]
    other = next(a for a in cluster.prefill if a != holder)
    # the holder's next load report advertises the prefix (the gateway hears it within 250 ms)
    asyncio.run(_wait_for(lambda: len(cluster.status_of(holder).cached_prefix_hashes) > 0))
    time.sleep(0.5)
    hits = _prefill_prefix_hits(fleet)

    def affine_picks() -> float:
        # by the worker's advertised summary, or (when its load report is momentarily stale,
        # as on a loaded machine) by the gateway's memory of where this prefix last went;
        # tests/gateway/test_router.py pins down which applies when
        metrics = fleet.gateway_metrics()
        return sum(sample(metrics, picks[0], reason=r) for r in (picks[1], "recent_route"))

    counted = affine_picks()
    on_other = fleet.requests_on(other)
    for i in range(4):  # one at a time: equal queues, so only the prefix can decide
        result = asyncio.run(_run_all(cluster.gateway, [[*prefix, *_prompt(60 + i, 30)]], 4))
        assert result[0].error is None, result
    assert affine_picks() == counted + 4
    assert fleet.requests_on(other) == on_other, "a prompt with a cached prefix went elsewhere"
    gained = {a: _prefill_prefix_hits(fleet)[a] - hits[a] for a in cluster.prefill}
    assert gained[holder] >= 4 * (len(prefix) - 16) and gained[other] == 0, gained
    print(f"\nprefix affinity: 4/4 prompts went to {holder}, prefix-cache hits +{gained[holder]}")
    fleet.assert_idle()


def _prefill_prefix_hits(fleet: Fleet) -> dict[str, float]:
    return {
        a: sample(scrape(fleet.metrics_port + 1 + i), "pdserve_prefix_cache_hits_total")
        for i, a in enumerate(fleet.cluster.prefill)
    }


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
        return await _stream(client, _prompt(9, 200), 800, timeout=0.25)  # 800 tokens: > 0.5 s


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

    retries_before = _total(fleet.gateway_metrics(), "pdserve_prefill_retries_total")
    logged_before = _log_count(cluster, "request_retrying", victim)
    results = asyncio.run(run())
    fleet.dead.add(victim)
    for got, want in zip(results, expected, strict=True):
        assert got.error is None, got
        assert got.tokens == want.tokens
    metrics = fleet.gateway_metrics()
    retries = _total(metrics, "pdserve_prefill_retries_total") - retries_before
    logged = _log_count(cluster, "request_retrying", victim) - logged_before
    assert retries == logged >= 1, (retries, logged)
    assert _total(metrics, "pdserve_prefill_retries_total", failed_tier="prefill") >= 1
    assert sample(metrics, "pdserve_decode_resumes_total", outcome="failed") == 0
    after = _noticed_after(cluster, victim, killed_at[0])
    print(f"\nprefill kill: gateway routed around the dead worker {after:.3f} s after the kill")
    fleet.assert_idle()


def _log_count(cluster: Cluster, event: str, address: str) -> int:
    return sum(
        1
        for line in cluster.log_path.read_text(errors="replace").splitlines()
        if f'"{event}"' in line and address in line
    )


def _routed_decode(cluster: Cluster, request_id: str) -> str:
    """The decode worker the gateway last routed ``request_id`` to."""
    routed = [
        json.loads(line)["decode"]
        for line in cluster.log_path.read_text(errors="replace").splitlines()
        if '"request_routed"' in line and f'"{request_id}"' in line
    ]
    assert routed, f"{request_id} was not routed"
    return str(routed[-1])


def _total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


ITEMS_SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 999},
                    "tag": {"enum": ["alpha", "beta", "gamma"]},
                    "note": {"type": "string", "maxLength": 16},
                },
                "required": ["id", "tag", "note"],
                "additionalProperties": False,
            },
            "minItems": 4,
            "maxItems": 8,
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}
STRUCTURED = StructuredOutput(GrammarKind.JSON_SCHEMA, json.dumps(ITEMS_SCHEMA))


@dataclass(frozen=True)
class StreamSpec:
    prompt: list[int]
    temperature: float = 0.0
    seed: int | None = None
    structured: StructuredOutput | None = None
    request_id: str = ""


def _decode_kill_specs() -> list[StreamSpec]:
    """Greedy streams, sampled ones with a seed (comparable with an undisturbed run), sampled
    ones without (the gateway seeds them: they must survive, with every token), and seeded
    sampled ones under a JSON schema (a resume continues the grammar from the tokens so far)."""
    specs = []
    for i in range(16):
        prompt = _prompt(500 + i, 60)
        kind = i % 3
        specs.append(
            StreamSpec(prompt)
            if kind == 0
            else StreamSpec(prompt, 0.9, 1000 + i if kind == 1 else None)
        )
    for i in range(MAX_CONCURRENT - len(specs)):  # the gateway admits MAX_CONCURRENT at once
        specs.append(
            StreamSpec(_prompt(700 + i, 40), 1.0, 2000 + i, STRUCTURED, f"structured-kill-{i}")
        )
    return specs


def test_kill_decode_with_streams_running(fleet: Fleet) -> None:
    cluster = fleet.cluster
    specs = _decode_kill_specs()
    max_tokens = 400

    async def undisturbed() -> list[Outcome]:
        async with AsyncClient(cluster.gateway) as client:
            streams = [
                _stream(
                    client,
                    s.prompt,
                    max_tokens,
                    temperature=s.temperature,
                    seed=s.seed,
                    structured=s.structured,
                )
                for s in specs
            ]
            return list(await asyncio.gather(*streams))

    seeded_before = _log_count(cluster, "seed_assigned", "seed")
    expected = asyncio.run(undisturbed())
    assert all(r.error is None for r in expected), [(r.error, r.details) for r in expected]
    unseeded = sum(1 for s in specs if s.temperature > 0 and s.seed is None)
    assert _log_count(cluster, "seed_assigned", "seed") - seeded_before == unseeded
    time.sleep(1.0)  # fresh load reports: the streams spread over both workers
    resumes_before = fleet.gateway_metrics()
    resumed_before = {a: _log_count(cluster, "stream_resuming", a) for a in cluster.decode}

    killed_at = [0.0]
    victims: list[str] = []

    async def run() -> list[Outcome]:
        progress: list[list[int]] = [[] for _ in specs]
        async with AsyncClient(cluster.gateway) as client:
            tasks = [
                asyncio.create_task(
                    _stream(
                        client,
                        s.prompt,
                        max_tokens,
                        progress[i],
                        temperature=s.temperature,
                        seed=s.seed,
                        structured=s.structured,
                        request_id=s.request_id,
                    )
                )
                for i, s in enumerate(specs)
            ]
            await _wait_for(lambda: all(sum(p) >= 4 for p in progress), poll_s=0.005)
            # the worker serving a JSON-schema stream: a resume must continue its grammar
            victims.append(_routed_decode(cluster, specs[-1].request_id))
            killed_at[0] = time.time()
            cluster.kill(f"decode-{cluster.decode.index(victims[0])}")
            return list(await asyncio.gather(*tasks))

    results = asyncio.run(run())
    victim = victims[0]
    fleet.dead.add(victim)
    survived = 0
    tokenizer = AutoTokenizer.from_pretrained(fleet.model)
    for spec, got, want in zip(specs, results, expected, strict=True):
        comparable = spec.temperature == 0 or spec.seed is not None
        if got.error is None:
            if spec.structured is None:
                assert len(got.tokens) == max_tokens, got
            else:  # ends when its JSON does, valid however often it was resumed
                assert got.finish == "stop", got
                jsonschema.validate(json.loads(tokenizer.decode(got.tokens)), ITEMS_SCHEMA)
            if comparable:  # resumed: no duplicated, no missing, no different tokens
                assert got.tokens == want.tokens, spec
            survived += 1
        else:
            assert got.error == grpc.StatusCode.UNAVAILABLE, got
            if comparable:
                assert got.tokens == want.tokens[: len(got.tokens)]
    resumed = _log_count(cluster, "stream_resuming", victim) - resumed_before[victim]
    assert resumed > 0, "no stream ran on the killed worker"
    structured_resumed = sum(
        _log_count(cluster, "stream_resuming", s.request_id) for s in specs if s.request_id
    )
    assert structured_resumed > 0, "no structured-output stream was resumed"
    metrics = fleet.gateway_metrics()
    name = "pdserve_decode_resumes_total"
    counted = sample(metrics, name, outcome="resumed") - sample(
        resumes_before, name, outcome="resumed"
    )
    assert counted == resumed, (counted, resumed)
    assert sample(metrics, name, outcome="failed") == sample(resumes_before, name, outcome="failed")
    print(
        f"\ndecode kill: {survived}/{len(specs)} streams survived ({resumed} were resumed from "
        f"the dead worker, {structured_resumed} of them under a JSON schema; greedy and "
        f"seeded-sampled streams all equal an undisturbed run); "
        f"gateway routed around it "
        f"{_noticed_after(cluster, victim, killed_at[0]):.3f} s after the kill"
    )
    failed = [(r.error, r.details) for r in results if r.error is not None]
    assert survived == len(specs), failed  # the other decode worker can take every stream
    fleet.assert_idle()


def test_without_prefill_workers_decode_workers_prefill_and_the_fallback_is_counted(
    fleet: Fleet,
) -> None:
    cluster = fleet.cluster
    fleet.live()
    prompts = [_prompt(700 + i, 100) for i in range(3)]
    expected = asyncio.run(_run_all(cluster.gateway, prompts, 8))
    assert all(r.error is None for r in expected), expected
    before = sample(
        fleet.gateway_metrics(), "pdserve_router_fallbacks_total", reason="prefill_unavailable"
    )
    for name, child in cluster.children().items():
        if name.startswith("prefill-") and child.address in cluster.prefill:
            killed_at = time.time()
            cluster.kill(name)
            fleet.dead.add(child.address)
            _noticed_after(cluster, child.address, killed_at)
    results = asyncio.run(_run_all(cluster.gateway, prompts, 8))
    for got, want in zip(results, expected, strict=True):
        assert got.error is None and got.tokens == want.tokens, got
    metrics = fleet.gateway_metrics()
    fallbacks = sample(metrics, "pdserve_router_fallbacks_total", reason="prefill_unavailable")
    assert fallbacks - before == len(prompts)
    assert sample(metrics, "pdserve_router_decisions_total", decision="local_no_prefill") >= 3
    fleet.assert_idle()
