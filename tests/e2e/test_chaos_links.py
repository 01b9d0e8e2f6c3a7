"""Bad links between the tiers (issue #15): 200 ms of latency and 5 % loss on the KV path and
between the gateway and the workers, and a KV path partitioned mid-transfer that comes back.
This kernel has no netem and no iptables, so the faults come from the suite's own TCP proxy
(tests/support/fault_proxy.py: its docstring gives the model of loss and partition) put between
the tiers, on one prefill and one decode worker of a tiny model:

    client -> gateway ------------------------------> prefill-0 --KV--> [kv proxy] --> decode-0
    client -> links gateway -> [prefill proxy] ----> prefill-0
                            \\-> [decode proxy] -----> decode-0

decode-0 advertises the kv proxy as its KV endpoint (``PDSERVE_KV_ADVERTISE``; it binds its
own), so every ticket sends prefill-0's pages through it; the links gateway is a copy of the
cluster's gateway whose ``--prefill``/``--decode`` name the other two proxies. Each case compares
greedy streams token for token with an undisturbed run made first, prints its figures, and ends
with every pool idle (all blocks free, nothing running, no pending transfer or reservation).

What each fault must cost, by design: KV latency and loss delay the second token (the first is
the prefill's answer, sent before the pages arrive), never the output; on the gateway's links
they delay every hop; a partition of the KV path is a stall, as TCP holds the bytes and delivers
them once the path heals (a transfer's lease is the caller's deadline, 60 s at most), so each stream
continues when it heals, and a caller whose deadline passes meanwhile gets DEADLINE_EXCEEDED
while every block and reservation is freed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from pdserve.client import AsyncClient
from pdserve.local_cluster import Cluster, free_port_range, start_cluster
from tests.e2e.chaos import prompt
from tests.support.fault_proxy import FaultProxy, ProxyStats
from tests.support.tiny_models import build_tiny_model

pytestmark = pytest.mark.e2e

LATENCY_S = 0.2
LOSS = 0.05
SEED = 15
MAX_TOKENS = 24
PARTITION_S = 3.0  # how long the KV path stays blackholed
AFTER_HEAL_S = 6.0  # heal -> every stream done (a stall far past the fault is a failure)
SHORT_DEADLINE_S = 1.5  # a caller whose deadline ends inside the partition
CUT_BYTES = 16 << 10  # where the partition starts: inside the first page frame on the wire


@dataclass
class Links:
    cluster: Cluster
    kv: FaultProxy
    """prefill-0 -> decode-0's KV endpoint."""
    prefill: FaultProxy
    """links gateway -> prefill-0's gRPC address."""
    decode: FaultProxy
    """links gateway -> decode-0's gRPC address."""
    gateway: str
    """The links gateway: its worker calls cross ``prefill`` and ``decode``."""
    gateway_log: Path

    def clear(self) -> None:
        for proxy in (self.kv, self.prefill, self.decode):
            proxy.clear()

    def assert_idle(self) -> None:
        for status in self.cluster.wait_idle(timeout_s=20):
            assert status.free_blocks == status.total_blocks, status
            assert status.running == 0 and status.waiting == 0, status
            assert status.pending_transfers == 0 and status.pool_ok, status


@pytest.fixture(scope="module")
def links(tmp_path_factory: pytest.TempPathFactory, cluster_logs: Path) -> Iterator[Links]:
    root = tmp_path_factory.mktemp("links")
    model = build_tiny_model(root / "tiny-llama", "llama", vocab_size=512, seed=3)
    key = root / "kv.key"
    key.write_text("links-test-key-0123456789abcdef")  # spawned copies read it from the file
    with contextlib.ExitStack() as stack:
        # upstreams are set once the workers are up (decode-0's KV port is the kernel's pick);
        # the cluster stops first, then the proxies (no reconnect storm through a closed port)
        kv, prefill, decode = (
            stack.enter_context(FaultProxy("127.0.0.1:9", seed=SEED + i)) for i in range(3)
        )
        env = {**os.environ, "PDSERVE_KV_ADVERTISE": f"tcp://{kv.address}"}
        cluster = start_cluster(
            str(model),
            prefill=1,
            decode=1,
            log_dir=cluster_logs,
            extra=("--kv-key-file", str(key), "--keep-going", "--no-prefix-caching"),
            env=env,
        )
        stack.callback(cluster.stop)
        bound = str(cluster.wait_event("kv_receiver_listening", timeout_s=10)["endpoint"])
        kv.upstream = bound.removeprefix("tcp://")
        prefill.upstream, decode.upstream = cluster.prefill[0], cluster.decode[0]
        gateway = f"127.0.0.1:{free_port_range(1)}"
        argv = list(cluster.children()["gateway"].argv)
        for flag, value in {
            "--listen": gateway,
            "--prefill": prefill.address,
            "--decode": decode.address,
            "--metrics-port": "0",
        }.items():
            argv[argv.index(flag) + 1] = value
        cluster.spawn(argv, "links-gateway")
        cluster.wait_serving(gateway, timeout_s=60)
        log = cluster.log_path.parent / f"{cluster.log_path.stem}-links-gateway.log"
        for address in (cluster.gateway, gateway):  # warm: kernels, the KV connection, channels
            assert all(r.code is None for r in _run(address, [prompt(1, 40)])), address
        assert kv.stats().bytes_up > 0 and decode.stats().bytes_down > 0
        yield Links(cluster, kv, prefill, decode, gateway, log)


@dataclass
class Run:
    tokens: list[int] = field(default_factory=list)
    code: grpc.StatusCode | None = None
    details: str = ""
    ttft_s: float = 0.0
    second_s: float = 0.0
    """Start -> the second token (the first the decode worker made: the KV had arrived)."""
    done_at: float = 0.0


async def _one(
    client: AsyncClient, prompt: list[int], timeout: float, out: Run | None = None
) -> Run:
    """One greedy stream; ``out`` (a fresh :class:`Run` if None) fills in as it goes."""
    out = Run() if out is None else out
    start = time.monotonic()
    try:
        async for chunk in client.generate(
            prompt_token_ids=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            ignore_eos=True,
            timeout=timeout,
        ):
            out.tokens.extend(chunk.token_ids)
            now = time.monotonic() - start
            if not out.ttft_s and out.tokens:
                out.ttft_s = now
            if not out.second_s and len(out.tokens) >= 2:
                out.second_s = now
    except grpc.aio.AioRpcError as exc:
        out.code, out.details = exc.code(), exc.details() or ""
    out.done_at = time.monotonic()
    return out


async def _all(gateway: str, prompts: list[list[int]], timeout: float = 60) -> list[Run]:
    async with AsyncClient(gateway) as client:
        return list(await asyncio.gather(*[_one(client, p, timeout) for p in prompts]))


def _run(gateway: str, prompts: list[list[int]]) -> list[Run]:
    return asyncio.run(_all(gateway, prompts))


def _same(got: list[Run], want: list[Run]) -> None:
    for r, w in zip(got, want, strict=True):
        assert r.code is None, (r.code, r.details)
        assert r.tokens == w.tokens and len(r.tokens) == MAX_TOKENS


def _figures(what: str, runs: list[Run]) -> str:
    ttft = [r.ttft_s for r in runs]
    second = [r.second_s for r in runs]
    return (
        f"{what}: TTFT median {statistics.median(ttft) * 1e3:.0f} ms (max {max(ttft) * 1e3:.0f}),"
        f" second token median {statistics.median(second) * 1e3:.0f} ms "
        f"(max {max(second) * 1e3:.0f})"
    )


def _traffic(proxy: FaultProxy, before: ProxyStats) -> str:
    now = proxy.stats()
    return (
        f"{now.bytes_up - before.bytes_up} B up, {now.bytes_down - before.bytes_down} B down, "
        f"{now.losses - before.losses} losses ({now.stall_s - before.stall_s:.1f} s of "
        f"retransmission timeouts)"
    )


PROMPTS = [prompt(100 + i, 40 + 40 * i) for i in range(4)]  # 40-160 tokens
KV_PROMPTS = [prompt(200 + i, 40 + 20 * i) for i in range(8)]  # 40-180 tokens


def test_latency_and_loss_on_the_kv_path(links: Links) -> None:
    want = _run(links.cluster.gateway, KV_PROMPTS)  # undisturbed (and the KV connection is up)
    assert all(w.code is None for w in want), want
    before = links.kv.stats()
    links.kv.latency_s, links.kv.loss = LATENCY_S, LOSS
    try:
        got = _run(links.cluster.gateway, KV_PROMPTS)
    finally:
        links.kv.clear()
    print(f"\nKV path {LATENCY_S * 1e3:.0f} ms + {LOSS:.0%} loss: {_traffic(links.kv, before)}")
    print("  " + _figures("undisturbed", want))
    print("  " + _figures("faulty", got))
    _same(got, want)
    after = links.kv.stats()
    assert after.bytes_up > before.bytes_up, "no KV page crossed the proxy"
    # the KV connection's upward draws under SEED lose its 7th chunk: these prompts send ~3
    # chunks each (two layers' pages, DONE), so every run meets a retransmission stall
    assert after.losses > before.losses, "the loss never struck: more chunks, or another seed"
    # the pages (and DONE) arrive a one-way delay after the prefill answered at the earliest
    assert min(r.second_s - r.ttft_s for r in got) >= 0.75 * LATENCY_S, got
    links.assert_idle()


def test_latency_and_loss_between_gateway_and_workers(links: Links) -> None:
    want = _run(links.cluster.gateway, PROMPTS)
    base = _run(links.gateway, PROMPTS)  # the links gateway without a fault
    _same(base, want)
    before = {p: p.stats() for p in (links.prefill, links.decode)}
    for proxy in (links.prefill, links.decode):
        proxy.latency_s, proxy.loss = LATENCY_S, LOSS
    try:
        got = _run(links.gateway, PROMPTS)
    finally:
        links.clear()
    print(f"\ngateway <-> workers {LATENCY_S * 1e3:.0f} ms + {LOSS:.0%} loss:")
    for name, proxy in (("prefill", links.prefill), ("decode", links.decode)):
        print(f"  {name} link: {_traffic(proxy, before[proxy])}")
    print("  " + _figures("undisturbed", base))
    print("  " + _figures("faulty", got))
    silent = links.gateway_log.read_text(errors="replace").count('"worker_silent"')
    print(f"  links gateway: worker_silent logged {silent}x")
    _same(got, want)
    for proxy in (links.prefill, links.decode):
        assert proxy.stats().bytes_down > before[proxy].bytes_down, "no reply crossed the proxy"
    # the load reports alone (4 a second each way) give the decode link dozens of draws
    assert links.decode.stats().losses > before[links.decode].losses, "the loss never struck"
    # two calls before the first token (decode's ticket, then the prefill), a round trip each
    assert min(r.ttft_s for r in got) >= 2 * 2 * LATENCY_S, got
    links.assert_idle()


def test_kv_path_partitioned_mid_transfer_then_healed(links: Links) -> None:
    cluster, kv = links.cluster, links.kv
    prompts = [prompt(300 + i, 120 + 20 * i) for i in range(4)]
    before = kv.stats()
    want = _run(cluster.gateway, prompts)
    assert all(w.code is None for w in want), want
    one_pass = kv.stats().bytes_up - before.bytes_up  # the KV bytes of these four prompts
    assert one_pass > 4 * CUT_BYTES, one_pass
    marks: dict[str, float] = {}

    async def partitioned() -> tuple[list[Run], Run]:
        async with AsyncClient(cluster.gateway) as client:
            # inside the first page frame on the wire (a layer of the shortest prompt is 32 KiB):
            # no transfer can complete before the heal
            kv.blackhole(after_bytes=CUT_BYTES)
            tasks = [asyncio.create_task(_one(client, p, 60)) for p in prompts]
            deadline = time.monotonic() + 20
            while not kv.blackholed:
                assert time.monotonic() < deadline, "the transfers never reached the cut"
                await asyncio.sleep(0.01)
            marks["cut"] = time.monotonic()
            # a caller arriving inside the partition, whose deadline ends before the heal
            late = asyncio.create_task(_one(client, prompt(399, 60), SHORT_DEADLINE_S))
            await asyncio.sleep(PARTITION_S)
            marks["heal"] = time.monotonic()
            kv.heal()
            return list(await asyncio.gather(*tasks)), await late

    try:
        got, late = asyncio.run(partitioned())
    finally:
        kv.clear()
    cut, heal = marks["cut"], marks["heal"]
    after_heal = [r.done_at - heal for r in got]
    print(
        f"\nKV path blackholed {PARTITION_S:.1f} s mid-transfer (after {CUT_BYTES} of the "
        f"{one_pass} B of pages): {len(got)}/{len(got)} streams finished "
        f"{min(after_heal):.2f}-{max(after_heal):.2f} s after the heal; the caller with a "
        f"{SHORT_DEADLINE_S} s deadline ended {late.code.name if late.code else 'OK'} "
        f"{late.done_at - cut:.2f} s after the cut"
    )
    _same(got, want)  # TCP held the pages; each stream continued once the path healed
    assert all(r.done_at > heal for r in got), "a stream finished through a blackholed path"
    assert max(after_heal) < AFTER_HEAL_S, after_heal
    assert late.code is grpc.StatusCode.DEADLINE_EXCEEDED, (late.code, late.details)
    assert late.done_at - cut < PARTITION_S, "the deadline was not kept through the partition"
    links.assert_idle()  # the late caller's reservation and its prefill's transfer included
    carried = kv.stats().bytes_up
    again = _run(cluster.gateway, prompts[:1])
    _same(again, want[:1])
    assert kv.stats().bytes_up > carried, "the healed path carried no KV"
    links.assert_idle()


RESET_DEADLINE_S = 10.0  # each caller's deadline, hence each transfer's lease
RESET_BOUND_S = 4.0  # reset -> every stream ended (resumed, or refused), far inside it


def test_kv_connection_reset_mid_transfer_costs_a_retry_not_the_lease(links: Links) -> None:
    """The KV connection reset while pages are on it (a middlebox losing its state; both
    workers live): the prefill worker sees the drop and fails the transfers with frames on it,
    and reconnects at once; their streams must resume (or end UNAVAILABLE) within seconds, not
    wait out the lease of the reservations nobody will fill."""
    cluster, kv = links.cluster, links.kv
    prompts = [prompt(500 + i, 120 + 20 * i) for i in range(2)]
    want = _run(cluster.gateway, prompts)
    connections = kv.stats().connections

    async def reset() -> tuple[list[Run], float]:
        async with AsyncClient(cluster.gateway) as client:
            kv.blackhole(after_bytes=CUT_BYTES)  # hold the pages mid-frame ...
            runs = [Run() for _ in prompts]
            tasks = [
                asyncio.create_task(_one(client, p, RESET_DEADLINE_S, r))
                for p, r in zip(prompts, runs, strict=True)
            ]
            deadline = time.monotonic() + 20
            while not (kv.blackholed and all(r.tokens for r in runs)):
                assert time.monotonic() < deadline, "the transfers never reached the cut"
                await asyncio.sleep(0.01)
            # every prompt was computed and its pages left the prefill worker (its socket
            # writes them out to the proxy, which holds them): nothing is left to resend
            await asyncio.sleep(0.3)
            assert kv.reset_all() == 1  # ... and lose them: the one KV connection is reset
            at = time.monotonic()
            kv.heal()
            return list(await asyncio.gather(*tasks)), at

    try:
        got, at = asyncio.run(reset())
    finally:
        kv.clear()
    ended = [r.done_at - at for r in got]
    outcomes = [(r.code.name if r.code else "OK", len(r.tokens)) for r in got]
    print(
        f"\nKV connection reset mid-transfer: (status, tokens) {outcomes}, ended "
        f"{min(ended):.2f}-{max(ended):.2f} s after the reset (deadline {RESET_DEADLINE_S} s)"
    )
    for r, w in zip(got, want, strict=True):
        assert r.code in (None, grpc.StatusCode.UNAVAILABLE), (r.code, r.details)
        assert r.tokens == w.tokens[: len(r.tokens)]
    assert max(ended) < RESET_BOUND_S, "a stream waited out its lease after the reset"
    links.assert_idle()
    again = _run(cluster.gateway, prompts[:1])
    _same(again, want[:1])
    assert kv.stats().connections > connections, "the prefill worker did not reconnect"
    links.assert_idle()
