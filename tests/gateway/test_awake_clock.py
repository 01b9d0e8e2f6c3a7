"""The gateway's awake clock: it stands still while the event loop does not run, so a gateway
that was itself paused does not find its workers silent; and a real pause of the loop (blocked
past ``stale_after_s``) no longer marks a reporting worker down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any, cast

from gateway.awake_clock import AwakeClock
from gateway.registry import TierRegistry
from gateway.worker_clients import WorkerStatus
from gateway.worker_entry import WorkerEntry, WorkerState


class FakeTime:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_without_a_ticker_it_is_the_monotonic_clock() -> None:
    t = FakeTime()
    clock = AwakeClock(tick_s=0.1, slack_s=0.25, monotonic=t)
    t.t += 5.0
    assert clock.now() == 105.0


def test_a_late_tick_counts_the_excess_as_a_pause_and_now_never_goes_back() -> None:
    asyncio.run(_a_late_tick_counts_the_excess_as_a_pause())


async def _a_late_tick_counts_the_excess_as_a_pause() -> None:
    t = FakeTime()
    clock = AwakeClock(tick_s=0.1, slack_s=0.25, monotonic=t)
    clock.start()
    try:
        t.t += 0.2  # a little late: scheduling noise, not a pause
        assert clock.now() == 100.2
        assert clock.tick() == 0.0
        seen = [clock.now()]
        for _ in range(50):  # a 5 s pause, observed before the ticker runs again
            t.t += 0.1
            seen.append(clock.now())
        assert seen == sorted(seen)
        assert seen[-1] - seen[0] < 0.1 + 0.25 + 1e-9  # it stood still after tick + slack
        frozen = clock.now()
        pause = clock.tick()
        assert abs(pause - (5.0 - 0.35)) < 1e-9 and abs(clock.now() - frozen) < 1e-9
        for _ in range(10):  # and runs on afterwards, ticking
            t.t += 0.1
            clock.tick()
        assert abs(clock.now() - (frozen + 1.0)) < 1e-9
    finally:
        await clock.stop()


class ReportingClient:
    """A healthy worker: a load report every 20 ms, for ever."""

    tier = "decode"

    def __init__(self) -> None:
        self.address = "d0"
        self.abandoned: list[str] = []

    async def watch_load(self, interval_ms: int) -> AsyncGenerator[WorkerStatus, None]:
        while True:
            yield WorkerStatus("decode", 10, 10, 0, 0, 0, True)
            await asyncio.sleep(0.02)

    async def watch_health(self) -> AsyncGenerator[bool, None]:
        yield True
        await asyncio.Event().wait()

    def abandon_calls(self, reason: str) -> int:
        self.abandoned.append(reason)
        return 0

    async def close(self) -> None:
        return None


def test_a_paused_gateway_does_not_blame_a_worker_that_kept_reporting() -> None:
    asyncio.run(_a_paused_gateway_does_not_blame_a_worker_that_kept_reporting())


async def _a_paused_gateway_does_not_blame_a_worker_that_kept_reporting() -> None:
    client = ReportingClient()
    clock = AwakeClock(tick_s=0.02, slack_s=0.05)
    tier = TierRegistry("decode", [], cast(Any, lambda a: client), stale_after_s=0.2, clock=clock)
    entry = WorkerEntry(cast(Any, client), clock.now)
    tier.add_entry(entry)
    clock.start()
    task = asyncio.create_task(tier._follow(entry))
    try:
        while entry.state is not WorkerState.SERVING:
            await asyncio.sleep(0.01)
        time.sleep(0.6)  # the gateway's own loop stops: 3x stale_after_s
        assert tier.routable() == [entry]  # its last report is fresh in awake time
        await asyncio.sleep(0.3)
        assert entry.state is WorkerState.SERVING and not client.abandoned
        assert clock.paused_s > 0.4
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await clock.stop()
