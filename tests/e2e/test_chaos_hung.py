"""A hung (not dead) worker: SIGSTOP a decode worker mid-stream and a prefill worker with prompts
on it, on two prefill + two decode workers (tiny model, ``--keep-going``). Its connections stay
up and it answers nothing; the gateway must notice the silence of its load stream, abandon the
calls on it, and resume them elsewhere: every request finishes token-identical (greedy) to an
undisturbed run within ``BOUND_S`` of the SIGSTOP. After SIGCONT the worker serves again and
every pool, the stopped worker's included, ends idle (its sequences were aborted).

Two more hung peers on the same cluster: the gateway (SIGSTOP mid-stream: calls end at their
deadline, the workers let go by themselves, the gateway serves again at once after SIGCONT),
and a client that stops reading its stream (the others on its worker are not held up, its KV
is freed when its sequence ends, the tiers' memory does not grow, and it gets every token when
it reads again), and one that hangs (SIGSTOP: its connection stays up, it answers nothing):
the gateway's keepalive pings go unanswered and its call ends, freeing its admission slot."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdserve.client import AsyncClient
from pdserve.local_cluster import Cluster, free_port_range, start_cluster
from tests.e2e.chaos import Run, assert_idle, greedy, greedy_all, prompt
from tests.support.tiny_models import build_tiny_model

pytestmark = pytest.mark.e2e

STALE_AFTER_S = 1.5  # the gateway's default --stale-after
BOUND_S = STALE_AFTER_S + 6.0  # SIGSTOP -> every affected request finished elsewhere


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, cluster_logs: Path) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("hung")
    model = build_tiny_model(root / "tiny-llama", "llama", vocab_size=512, seed=3)
    c = start_cluster(
        str(model), prefill=2, decode=2, log_dir=cluster_logs, extra=("--keep-going",)
    )
    try:
        yield c
    finally:
        c.stop()


def _stopped(
    cluster: Cluster,
    names: list[str],
    prompts: list[list[int]],
    max_tokens: int,
    ready: str,
) -> tuple[list[Run], float, str]:
    """Run ``prompts``; SIGSTOP the first child of ``names`` on which ``ready`` holds; SIGCONT
    it after every request ended. Returns the runs, the SIGSTOP's monotonic time, the child."""
    stopped_at = [0.0]
    chosen: list[str] = []

    async def run() -> list[Run]:
        runs = [Run() for _ in prompts]
        async with AsyncClient(cluster.gateway) as client:
            tasks = [
                asyncio.create_task(greedy(client, p, max_tokens, r))
                for p, r in zip(prompts, runs, strict=True)
            ]
            deadline = time.monotonic() + 30
            while not chosen:
                for name in names:
                    status = await asyncio.to_thread(cluster.status_of, children[name].address)
                    busy = status.running if ready == "running" else status.in_flight
                    if busy >= 1 and (ready != "running" or all(len(r.tokens) >= 4 for r in runs)):
                        stopped_at[0] = time.monotonic()
                        os.kill(children[name].pid, signal.SIGSTOP)
                        chosen.append(name)
                        break
                assert time.monotonic() < deadline, "no worker got work"
            return list(await asyncio.gather(*tasks))

    children = cluster.children()
    try:
        runs = asyncio.run(run())
    finally:
        for name in chosen:
            os.kill(children[name].pid, signal.SIGCONT)
    return runs, stopped_at[0], chosen[0]


def _check(
    cluster: Cluster, name: str, what: str, got: list[Run], want: list[Run], t0: float
) -> None:
    after = [r.done_at - t0 for r in got]
    print(
        f"\n{what}: {len(got)}/{len(got)} requests; completed {min(after):.2f}-{max(after):.2f} s "
        f"after the SIGSTOP (bound {BOUND_S} s)"
    )
    for r, w in zip(got, want, strict=True):
        assert r.error == "", r.error
        assert r.tokens == w.tokens
    address = cluster.children()[name].address
    silent = [e for e in cluster.events("worker_silent") if e.get("address") == address]
    abandoned = sum(int(str(e.get("calls_abandoned", 0))) for e in silent)
    print(f"  gateway: worker_silent logged {len(silent)}x, {abandoned} calls abandoned")
    assert max(after) < BOUND_S, after
    assert abandoned >= 1, "no call was on the stopped worker"
    cluster.wait_serving(address)
    before = cluster.status_of(address).requests_total
    deadline = time.monotonic() + 20
    while cluster.status_of(address).requests_total == before:  # routed to again
        asyncio.run(greedy_all(cluster.gateway, [prompt(900, 40)] * 4, 4))
        assert time.monotonic() < deadline, f"{address} not routed to after SIGCONT"
    assert_idle(cluster.wait_idle(timeout_s=20))


def test_sigstop_decode_with_streams_running(cluster: Cluster) -> None:
    prompts = [prompt(100 + i, 60) for i in range(8)]
    want = asyncio.run(greedy_all(cluster.gateway, prompts, 120))
    time.sleep(1.0)  # fresh load reports: the streams spread over both workers
    got, t0, name = _stopped(cluster, ["decode-0"], prompts, 120, "running")
    _check(cluster, name, "decode SIGSTOP mid-stream", got, want, t0)


def test_sigstop_prefill_with_prompts_on_it(cluster: Cluster) -> None:
    prompts = [prompt(450 + i, 600) for i in range(8)]
    want = asyncio.run(greedy_all(cluster.gateway, prompts, 6))
    time.sleep(1.0)
    got, t0, name = _stopped(cluster, ["prefill-0", "prefill-1"], prompts, 6, "in_flight")
    _check(cluster, name, "prefill SIGSTOP mid-prefill", got, want, t0)


def test_sigstop_gateway_with_streams_running(cluster: Cluster) -> None:
    """The gateway hung mid-stream: every client call ends at its deadline (DEADLINE_EXCEEDED,
    nothing hangs past it); the workers end the calls themselves at the deadline the gateway
    propagated (their pools empty while the gateway is still stopped); a call without a
    deadline ends UNAVAILABLE once the SDK's keepalive pings go unanswered; after SIGCONT the
    gateway serves again, its workers marked up again, and every pool ends idle."""
    timeout_s = 4.0
    prompts = [prompt(700 + i, 24) for i in range(6)]
    max_tokens = 1000 - 24  # far more than the deadline lets the tiny model produce
    runs = [Run() for _ in prompts]
    no_deadline = Run()
    gateway = cluster.children()["gateway"]

    async def run() -> tuple[float, int]:
        async with (
            AsyncClient(cluster.gateway) as client,
            AsyncClient(cluster.gateway, keepalive_s=1.0) as pinging,
        ):
            tasks = [
                asyncio.create_task(greedy(client, p, max_tokens, r, timeout_s))
                for p, r in zip(prompts, runs, strict=True)
            ]
            tasks.append(
                asyncio.create_task(greedy(pinging, prompts[0], max_tokens, no_deadline, None))
            )
            while not all(len(r.tokens) >= 4 for r in [*runs, no_deadline]):
                assert time.monotonic() < tasks_started + timeout_s, "streams never started"
                await asyncio.sleep(0.01)
            stopped_at = time.monotonic()
            os.kill(gateway.pid, signal.SIGSTOP)
            await asyncio.sleep(0.5)
            decode = [await asyncio.to_thread(cluster.status_of, a) for a in cluster.decode]
            running = sum(s.running for s in decode)
            await asyncio.gather(*tasks)
            return stopped_at, running

    tasks_started = time.monotonic()
    try:
        stopped_at, running = asyncio.run(run())
        # the gateway is still stopped: the workers must let go of the calls on their own
        statuses = cluster.wait_idle(timeout_s=10)
        freed_at = time.monotonic()
    finally:
        os.kill(gateway.pid, signal.SIGCONT)
    continued_at = time.monotonic()
    ended = [r.done_at - tasks_started for r in runs]
    print(
        f"\ngateway SIGSTOP: {len(runs)} streams ended {min(ended):.2f}-{max(ended):.2f} s after "
        f"their start (deadline {timeout_s} s), {running} still running on the decode workers "
        f"0.5 s into the stop; pools free {freed_at - stopped_at:.2f} s after the SIGSTOP"
    )
    assert running >= 1, "the streams ended before the gateway stopped: nothing was tested"
    for r in runs:
        assert "DEADLINE_EXCEEDED" in r.error, r.error
        assert r.done_at - tasks_started < timeout_s + 2.0, r.done_at - tasks_started
    print(f"  no deadline: {no_deadline.error[:60]} {no_deadline.done_at - stopped_at:.2f} s in")
    assert no_deadline.error.startswith("UNAVAILABLE"), no_deadline.error
    assert no_deadline.done_at - stopped_at < 1.0 + 1.0 + 2.0  # ping, timeout, slack
    assert_idle(statuses)
    after = asyncio.run(greedy_all(cluster.gateway, [prompt(990, 40)] * 4, 8))
    assert all(r.error == "" and len(r.tokens) == 8 for r in after), after
    print(f"  serving again {time.monotonic() - continued_at:.2f} s after SIGCONT")
    assert_idle(cluster.wait_idle(timeout_s=20))


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def test_a_client_that_stops_reading_holds_up_no_one(cluster: Cluster) -> None:
    """A stream with 20 logprobs per token (~0.3 kB a message, past HTTP/2's flow-control
    windows) whose client stops reading after its first chunk: its decode worker finishes it
    and frees its blocks anyway (the tokens wait in the stream's buffers: at most max_tokens of
    them, so a slow reader's memory is bounded by its request), streams started meanwhile on
    the same workers finish while it is still not reading, no process grows, and when it reads
    again it gets every token, identical to an undisturbed run."""
    slow_prompt = prompt(1200, 24)
    max_tokens = 900
    others = [prompt(1300 + i, 40) for i in range(4)]
    names = ["gateway", *sorted(n for n in cluster.children() if n.startswith("decode"))]

    async def read(client: AsyncClient, pause_s: float, events: dict[str, asyncio.Event]) -> Run:
        out = Run()
        stream = client.generate(
            prompt_token_ids=slow_prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=True,
            logprobs=20,
            timeout=120,
        )
        async for chunk in stream:
            if not out.tokens and pause_s:
                events["paused"].set()
                await events["resume"].wait()
            out.tokens.extend(chunk.token_ids)
        return out

    async def run(pause_s: float) -> tuple[Run, list[Run], dict[str, float], bool]:
        events = {"paused": asyncio.Event(), "resume": asyncio.Event()}
        async with AsyncClient(cluster.gateway) as client:
            slow = asyncio.create_task(read(client, pause_s, events))
            if not pause_s:
                return await slow, [], {}, True
            await events["paused"].wait()
            pids = {n: cluster.children()[n].pid for n in names}
            before = {n: _rss_mb(pid) for n, pid in pids.items()}
            await asyncio.sleep(pause_s)  # the slow stream's sequence ends on its worker
            meanwhile = await greedy_all(cluster.gateway, others, 16)
            idle = all(
                s.free_blocks == s.total_blocks and s.running == 0
                for s in await asyncio.to_thread(cluster.wait_idle, 10.0)
            )
            growth = {n: _rss_mb(pid) - before[n] for n, pid in pids.items()}
            events["resume"].set()
            return await slow, meanwhile, growth, idle

    want, _, _, _ = asyncio.run(run(0.0))
    got, meanwhile, growth, idle_while_paused = asyncio.run(run(3.0))
    print(
        "\nslow reader: RSS growth while it did not read: "
        + ", ".join(f"{n} {mb:+.1f} MB" for n, mb in growth.items())
    )
    assert len(want.tokens) == max_tokens
    assert got.tokens == want.tokens
    assert all(r.error == "" and len(r.tokens) == 16 for r in meanwhile), meanwhile
    assert idle_while_paused, "the unread stream still held KV after its sequence ended"
    assert all(mb < 50 for mb in growth.values()), growth


HUNG_CLIENT = """
import sys
from pdserve.client import Client
with Client(sys.argv[1]) as client:
    stream = client.generate(
        prompt_token_ids=[5, 6, 7, 8], max_tokens=900, temperature=0.0, ignore_eos=True,
        logprobs=20, request_id=sys.argv[2],
    )
    next(stream)
    print("streaming", flush=True)
    sys.stdin.read()  # never reads the stream again
"""


def _established(port: int) -> int:
    """TCP connections in ESTABLISHED state whose local port is ``port`` (this machine)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                count += 1
    return count


def test_a_hung_client_loses_its_connection_to_the_keepalive(cluster: Cluster) -> None:
    """A client process SIGSTOPped mid-stream: its kernel still acknowledges TCP, so nothing
    but an HTTP/2 ping can tell it is gone. A gateway with ``--keepalive 1 --keepalive-timeout
    1`` drops its connection within seconds, and with it what it buffered for the client and
    any call still on it (without pings the connection lived as long as the client was
    stopped); its KV is freed and the gateway serves on."""
    port = free_port_range(1)
    argv = list(cluster.children()["gateway"].argv)
    for flag, value in {"--listen": f"127.0.0.1:{port}", "--http-port": "0"}.items():
        argv[argv.index(flag) + 1] = value
    argv[argv.index("--metrics-port") + 1] = "0"
    cluster.spawn([*argv, "--keepalive", "1", "--keepalive-timeout", "1"], "keepalive-gateway")
    gateway = f"127.0.0.1:{port}"
    cluster.wait_serving(gateway, timeout_s=60)
    client = subprocess.Popen(
        [sys.executable, "-c", HUNG_CLIENT, gateway, f"hung-client-{port}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert client.stdout is not None and client.stdout.readline() == b"streaming\n"
        assert _established(port) == 1
        client.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        while _established(port) and time.monotonic() < stopped_at + 20:
            time.sleep(0.05)
        took = time.monotonic() - stopped_at
        print(f"\nhung client: the gateway dropped its connection {took:.2f} s after the SIGSTOP")
        assert _established(port) == 0, "the hung client's connection is still up"
        assert_idle(cluster.wait_idle(timeout_s=20))
        after = asyncio.run(greedy_all(gateway, [prompt(995, 30)] * 2, 4))
        assert all(r.error == "" and len(r.tokens) == 4 for r in after), after
    finally:
        client.send_signal(signal.SIGCONT)
        client.kill()
        client.wait()
