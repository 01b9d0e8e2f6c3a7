"""Network partitions between the tiers, with workers in network namespaces of their own
(``tests.support.netns``): packets vanish both ways, no RST, as when a real network splits.

The fleet: ``pdserve up`` (tiny model, one prefill and one decode worker on loopback,
``--keep-going``), plus a decode worker in namespace D, whose gateway also routes to it, and a
prefill worker in namespace P behind a second gateway (prefill: the cluster's and P's; decode:
D's, which P reaches through this side). Cutting D cuts both gateways and both prefill workers
off from it; cutting P cuts the second gateway and D off from P; severing the path from P to D
leaves every gateway's view intact (``test_partition_between_prefill_and_decode``).

Cut while greedy streams are mid-decode on D, while prompts are reserved on D with their pages
not all arrived (queued for, in, or just out of the prefill), and while prompts are on P: the
gateway hears no load report from the cut-off worker for ``--stale-after`` (1.5 s), marks it
down and abandons its calls, which fail over. Every request must finish token-identical to an
undisturbed run within ``BOUND_S`` of the cut, with no error: a healthy worker of the same tier
can take them all, so no failure is acceptable. Healed once they all ended, the worker serves
again (its request count rises) within ``SERVING_WITHIN_S`` and every pool on every tier, its
own included, ends idle within ``IDLE_WITHIN_S`` of the heal. Skipped where network namespaces
cannot be made (not root, no iproute2).

Tests run in file order on one fleet, each ending with the cut-off worker serving again."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from pdserve.client import NO_RETRY, AsyncClient
from pdserve.launcher import serving
from pdserve.local_cluster import READY_TIMEOUT_S, Cluster, free_port_range, start_cluster
from protos.pdserve.v1 import worker_pb2
from tests.e2e.chaos import Run, greedy, greedy_all, prompt
from tests.support import netns
from tests.support.netns import NetNamespace
from tests.support.tiny_models import build_tiny_model

pytestmark = pytest.mark.e2e

STALE_AFTER_S = 1.5  # the gateways' default --stale-after
BOUND_S = STALE_AFTER_S + 6.0  # partition -> every affected request finished elsewhere
SERVING_WITHIN_S = 20.0  # heal -> the healed worker takes requests again
IDLE_WITHIN_S = 20.0  # heal -> every pool idle
DEADLINE_S = 20.0  # each request's; past BOUND_S, so that reaching it is a failure
NS_PORT = 20071  # a namespace has a network stack of its own: any port is free there


@dataclass(frozen=True)
class Side:
    """A namespaced worker, and the gateway whose requests reach it."""

    net: NetNamespace
    address: str
    gateway: str
    gateway_log: Path


@dataclass
class Fleet:
    cluster: Cluster
    decode: Side
    prefill: Side


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, cluster_logs: Path) -> Iterator[Fleet]:
    reason = netns.available()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("partition")
    model = build_tiny_model(root / "tiny-llama", "llama", vocab_size=512, seed=3)
    key = root / "kv.key"  # the workers started beside the cluster must share its KV key
    key.write_text("partition-test-key-0123456789abcdef")
    with NetNamespace() as dnet, NetNamespace() as pnet:
        dnet.reach(pnet)  # P's prefill worker pushes pages to D's decode worker
        decode, prefill = f"{dnet.inside}:{NS_PORT}", f"{pnet.inside}:{NS_PORT}"
        cluster = start_cluster(
            str(model),
            prefill=1,
            decode=1,
            log_dir=cluster_logs,
            extra=(
                *("--kv-key-file", str(key), "--keep-going", "--also-decode", decode),
                *("--shutdown-grace", "1"),  # nothing left to drain at the end
            ),
        )
        try:
            yield _spawn(cluster, dnet, pnet, decode, prefill)
        finally:
            for net in (dnet, pnet):
                if net.partitioned:
                    net.heal()  # so that the workers inside end their drains
            dnet.mend(pnet)
            cluster.stop()


def _spawn(
    cluster: Cluster, dnet: NetNamespace, pnet: NetNamespace, decode: str, prefill: str
) -> Fleet:
    """Start D's decode worker, P's prefill worker and the second gateway from the cluster's
    own command lines; returns once all serve."""
    children = cluster.children()
    no_metrics = {"--metrics-port": "0"}
    d_argv = _moved(
        children["decode-0"].argv,
        {"--listen": decode, "--kv-bind": f"tcp://{dnet.inside}:0", **no_metrics},
    )
    p_argv = _moved(children["prefill-0"].argv, {"--listen": prefill, **no_metrics})
    gateway = f"127.0.0.1:{free_port_range(1)}"
    g_argv = [
        *_moved(
            _without(children["gateway"].argv, "--prefill", "--decode"),
            {"--listen": gateway, "--http-port": "0", **no_metrics},
        ),
        *("--prefill", f"{cluster.prefill[0]},{prefill}", "--decode", decode),
    ]
    _start(
        cluster,
        ([*dnet.prefix(), *d_argv], decode, "netns-decode"),
        ([*pnet.prefix(), *p_argv], prefill, "netns-prefill"),
        (g_argv, gateway, "gateway2"),
    )
    cluster.decode.append(decode)
    cluster.prefill.append(prefill)
    gateway_log = cluster.log_path.parent / f"{cluster.log_path.stem}-gateway2.log"
    return Fleet(
        cluster,
        Side(dnet, decode, cluster.gateway, cluster.log_path),
        Side(pnet, prefill, gateway, gateway_log),
    )


def _start(cluster: Cluster, *jobs: tuple[list[str], str, str]) -> None:
    """Spawn each ``(argv, address, log name)`` beside the cluster at once; returns once all
    serve at their addresses, failing at once if one exits."""
    procs = [(cluster.spawn(argv, name), address, name) for argv, address, name in jobs]
    deadline = time.monotonic() + READY_TIMEOUT_S
    for proc, address, name in procs:
        while not serving(address):
            if proc.poll() is not None:
                log = cluster.log_path.parent / f"{cluster.log_path.stem}-{name}.log"
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{address} exited with {proc.returncode}:\n{tail}")
            assert time.monotonic() < deadline, f"{address} not serving in {READY_TIMEOUT_S} s"
            time.sleep(0.2)


def _moved(argv: tuple[str, ...] | list[str], new: dict[str, str]) -> list[str]:
    """A command line with the values of the flags in ``new`` replaced (or added)."""
    out = list(argv)
    for flag, value in new.items():
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


def _without(argv: tuple[str, ...], *flags: str) -> list[str]:
    """A command line without ``flags`` and their values."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if not skip and arg in flags:
            skip = True
            continue
        if not skip:
            out.append(arg)
        skip = False
    return out


def _undisturbed(side: Side, prompts: list[list[int]], max_tokens: int) -> list[Run]:
    _answers(side.gateway)  # the second gateway may not have seen D's heal yet
    want = asyncio.run(greedy_all(side.gateway, prompts, max_tokens, DEADLINE_S, NO_RETRY))
    assert all(r.error == "" for r in want), [r.error for r in want]
    time.sleep(1.0)  # fresh load reports: the next requests spread over the tier again
    return want


def _answers(gateway: str) -> None:
    """Until ``gateway`` serves a request (its workers may still be down in its view)."""
    deadline = time.monotonic() + SERVING_WITHIN_S
    while (
        run := asyncio.run(greedy_all(gateway, [prompt(1, 20)], 2, DEADLINE_S, NO_RETRY))[0]
    ).error:
        assert time.monotonic() < deadline, f"{gateway} still fails: {run.error}"
        time.sleep(0.1)


Ready = Callable[[worker_pb2.WorkerStatus, list[Run]], bool]


@dataclass
class Cut:
    runs: list[Run]
    at: float
    """monotonic time of the partition"""
    wall: float
    """the same, wall clock (to compare with log timestamps)"""
    status: worker_pb2.WorkerStatus
    """the cut-off worker's last status before the partition"""
    silent_before: int
    """worker_silent lines its gateway had logged for it before"""
    heal: Callable[[], None]


def _partitioned(
    cluster: Cluster,
    side: Side,
    prompts: list[list[int]],
    max_tokens: int,
    ready: Ready,
    cut: tuple[Callable[[], None], Callable[[], None]] | None = None,
) -> Cut:
    """Run ``prompts``; partition ``side`` (or run ``cut``'s first, its second heals) once
    ``ready`` holds for its worker's status (and the runs so far); returns once every request
    ended, still partitioned."""
    silent_before = len(_silent_events(side))
    partition, heal = cut or (side.net.partition, side.net.heal)

    async def run() -> Cut:
        runs = [Run() for _ in prompts]
        async with AsyncClient(side.gateway, retry=NO_RETRY) as client:
            tasks = [
                asyncio.create_task(greedy(client, p, max_tokens, r, DEADLINE_S))
                for p, r in zip(prompts, runs, strict=True)
            ]
            deadline = time.monotonic() + 30
            while True:
                status = await asyncio.to_thread(cluster.status_of, side.address)
                if ready(status, runs):
                    break
                assert time.monotonic() < deadline, f"no work reached {side.address}"
            at, wall = time.monotonic(), time.time()
            partition()
            await asyncio.gather(*tasks)
            return Cut(runs, at, wall, status, silent_before, heal)

    return asyncio.run(run())


def _silent_events(side: Side) -> list[dict[str, object]]:
    """The gateway's ``worker_silent`` lines about ``side``'s worker."""
    found = []
    for line in side.gateway_log.read_text(errors="replace").splitlines():
        if '"worker_silent"' in line and side.address in line:
            record = json.loads(line)
            if record.get("event") == "worker_silent" and record.get("address") == side.address:
                found.append(record)
    return found


def _serving_again(cluster: Cluster, side: Side) -> float:
    """Seconds until ``side``'s worker took a request again (new prompts, 4 at a time)."""
    start = time.monotonic()
    before = cluster.status_of(side.address).requests_total
    for i in range(1000):
        if cluster.status_of(side.address).requests_total > before:
            break
        prompts = [prompt(900 + 4 * i + j, 40) for j in range(4)]  # no prefix to stick to
        runs = asyncio.run(greedy_all(side.gateway, prompts, 4, DEADLINE_S, NO_RETRY))
        assert all(r.error == "" for r in runs), [r.error for r in runs]
        elapsed = time.monotonic() - start
        assert elapsed < SERVING_WITHIN_S, f"{side.address} not routed to {elapsed:.1f}s on"
    return time.monotonic() - start


def _check(
    cluster: Cluster, side: Side, what: str, cut: Cut, want: list[Run], silent: bool = True
) -> None:
    """Heal; then: every request as undisturbed, in time; the gateway found the worker
    ``silent`` (or not: its load stream never stopped); serving again; every pool idle."""
    healed = time.monotonic()
    cut.heal()
    after = sorted(r.done_at - cut.at for r in cut.runs)
    failed = [r.error.split(":")[0] for r in cut.runs if r.error]
    print(
        f"\n{what}: {len(cut.runs)} requests, {len(failed)} failed {failed}; on the cut-off "
        f"worker at the cut: {cut.status.in_flight} calls, {cut.status.running} running, "
        f"{cut.status.pending_transfers} awaiting pages; each request ended "
        f"{', '.join(f'{a:.2f}' for a in after)} s after the cut (bound {BOUND_S} s)"
    )
    found = _silent_events(side)[cut.silent_before :]
    abandoned = sum(int(str(e.get("calls_abandoned", 0))) for e in found)
    if found:
        noticed = datetime.fromisoformat(str(found[0]["timestamp"])).timestamp() - cut.wall
        print(f"  gateway: worker_silent {noticed:.2f} s after the cut, {abandoned} abandoned")
    serving = _serving_again(cluster, side)
    statuses = cluster.wait_idle(timeout_s=IDLE_WITHIN_S)
    idle = time.monotonic() - healed
    print(f"  healed: serving again after {serving:.2f} s, every pool idle after {idle:.2f} s")
    for got, expected in zip(cut.runs, want, strict=True):
        assert got.error == "", got.error
        assert got.tokens == expected.tokens
    assert after[-1] < BOUND_S, after
    if silent:
        assert abandoned >= 1, f"the gateway abandoned no call on {side.address}: {found}"
    else:
        assert not found, found
    for status in statuses:
        assert status.free_blocks == status.total_blocks, status
        assert status.running == 0 and status.waiting == 0, status
        assert status.pending_transfers == 0 and status.pool_ok, status


def test_the_namespaced_workers_serve(fleet: Fleet) -> None:
    """Each takes work through its gateway (so that the partitions below cut real calls)."""
    for side in (fleet.decode, fleet.prefill):
        took = _serving_again(fleet.cluster, side)
        print(f"\nnamespaced worker {side.address} took work {took:.2f} s on")


def test_partition_decode_with_streams_running(fleet: Fleet) -> None:
    prompts = [prompt(100 + i, 60) for i in range(8)]
    want = _undisturbed(fleet.decode, prompts, 120)

    def mid_decode(status: worker_pb2.WorkerStatus, runs: list[Run]) -> bool:
        return status.running >= 1 and all(len(r.tokens) >= 4 for r in runs)

    cut = _partitioned(fleet.cluster, fleet.decode, prompts, 120, mid_decode)
    _check(fleet.cluster, fleet.decode, "decode cut off mid-decode", cut, want)


def test_partition_decode_with_transfers_pending(fleet: Fleet) -> None:
    prompts = [prompt(300 + i, 800) for i in range(8)]
    want = _undisturbed(fleet.decode, prompts, 6)

    def awaiting_pages(status: worker_pb2.WorkerStatus, runs: list[Run]) -> bool:
        return status.pending_transfers >= 1

    cut = _partitioned(fleet.cluster, fleet.decode, prompts, 6, awaiting_pages)
    _check(fleet.cluster, fleet.decode, "decode cut off with transfers pending", cut, want)


def test_partition_prefill_with_prompts_on_it(fleet: Fleet) -> None:
    prompts = [prompt(450 + i, 600) for i in range(8)]
    want = _undisturbed(fleet.prefill, prompts, 6)

    def prompts_on_it(status: worker_pb2.WorkerStatus, runs: list[Run]) -> bool:
        return status.in_flight >= 1

    cut = _partitioned(fleet.cluster, fleet.prefill, prompts, 6, prompts_on_it)
    _check(fleet.cluster, fleet.prefill, "prefill cut off with prompts on it", cut, want)


def test_partition_between_prefill_and_decode(fleet: Fleet) -> None:
    """Only the path from P's prefill worker to D's decode worker is cut: both gateways still
    reach both. A prompt prefilled on P cannot reach D, so its transfer must fail and the
    request go elsewhere (the gateway has nothing to notice: every load stream flows)."""
    prompts = [prompt(600 + i, 300) for i in range(8)]
    want = _undisturbed(fleet.prefill, prompts, 6)
    dnet, pnet = fleet.decode.net, fleet.prefill.net

    def prompts_on_it(status: worker_pb2.WorkerStatus, runs: list[Run]) -> bool:
        return status.in_flight >= 1

    cut = (lambda: dnet.sever(pnet), lambda: dnet.mend(pnet))
    cut_off = _partitioned(fleet.cluster, fleet.prefill, prompts, 6, prompts_on_it, cut)
    _check(fleet.cluster, fleet.prefill, "prefill-decode path cut", cut_off, want, silent=False)
