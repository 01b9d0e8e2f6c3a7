"""A worker whose load stream falls silent (hung, e.g. SIGSTOP): the registry marks it down and
abandons its calls in flight, which then fail as retryable UNAVAILABLE (so failover resumes them);
a call whose own task is cancelled still sees the cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any, cast

import grpc
import pytest

from gateway.errors import UpstreamError
from gateway.registry import TierRegistry
from gateway.worker_calls import OpenCalls
from gateway.worker_clients import WorkerStatus
from gateway.worker_entry import WorkerEntry, WorkerState


class FakeCall:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class SilentClient:
    """One load report, then nothing; health SERVING and then quiet."""

    tier = "decode"

    def __init__(self, address: str) -> None:
        self.address = address
        self.abandoned: list[str] = []

    async def watch_load(self, interval_ms: int) -> AsyncGenerator[WorkerStatus, None]:
        yield WorkerStatus("decode", 10, 10, 0, 0, 0, True)
        await asyncio.Event().wait()

    async def watch_health(self) -> AsyncGenerator[bool, None]:
        yield True
        await asyncio.Event().wait()

    def abandon_calls(self, reason: str) -> int:
        self.abandoned.append(reason)
        return 1

    async def close(self) -> None:
        return None


def test_a_silent_load_stream_marks_the_worker_down_and_abandons_its_calls() -> None:
    asyncio.run(_a_silent_load_stream_marks_the_worker_down_and_abandons_its_calls())


async def _a_silent_load_stream_marks_the_worker_down_and_abandons_its_calls() -> None:
    client = SilentClient("d0")
    tier = TierRegistry("decode", [], cast(Any, lambda a: client), stale_after_s=0.2)
    entry = WorkerEntry(cast(Any, client))
    tier.add_entry(entry)
    task = asyncio.create_task(tier._follow(entry))
    try:
        for _ in range(100):
            if client.abandoned:
                break
            await asyncio.sleep(0.02)
        assert client.abandoned and "no load report" in client.abandoned[0]
        assert entry.state is WorkerState.DOWN
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_an_abandoned_call_fails_retryable_unavailable() -> None:
    asyncio.run(_an_abandoned_call_fails_retryable_unavailable())


async def _an_abandoned_call_fails_retryable_unavailable() -> None:
    calls = OpenCalls()
    call = FakeCall()
    calls.add(cast(Any, call))
    assert calls.failure("decode", "d0", cast(Any, call)) is None  # not abandoned
    assert calls.abandon("silent") == 1 and call.cancelled
    error = calls.failure("decode", "d0", cast(Any, call))
    assert isinstance(error, UpstreamError)
    assert error.retryable and error.code is grpc.StatusCode.UNAVAILABLE
    calls.discard(cast(Any, call))
    assert calls.abandon("again") == 0


def test_a_cancelled_task_is_not_turned_into_a_retry() -> None:
    asyncio.run(_a_cancelled_task_is_not_turned_into_a_retry())


async def _a_cancelled_task_is_not_turned_into_a_retry() -> None:
    calls = OpenCalls()
    call = FakeCall()
    calls.add(cast(Any, call))
    calls.abandon("silent")
    seen: list[UpstreamError | None] = []

    async def waiter() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append(calls.failure("decode", "d0", cast(Any, call)))
            raise

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == [None]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_the_silence_allowed_grows_with_the_gaps_a_link_showed_up_to_a_cap() -> None:
    clock = Clock()
    entry = WorkerEntry(cast(Any, SilentClient("d0")), clock)
    report = WorkerStatus("decode", 10, 10, 0, 0, 0, True)
    entry.on_load(report)
    assert entry.allowed_silence(1.5) == 1.5  # nothing learnt yet
    for gap in (0.25, 0.25, 0.9, 0.25):  # one retransmission stall
        clock.t += gap
        entry.on_load(report)
    assert entry.allowed_silence(1.5) == pytest.approx(3 * 0.9)
    clock.t += 3.0
    entry.on_load(report)  # a 3 s gap: the cap, 4 x stale_after_s, still finds a hang
    assert entry.allowed_silence(1.5) == 6.0
    entry.on_down("stream ended")
    assert entry.allowed_silence(1.5) == 1.5  # a new connection learns afresh


class StallingClient(SilentClient):
    """Reports every 20 ms, one 250 ms stall among them, then nothing ever again."""

    async def watch_load(self, interval_ms: int) -> AsyncGenerator[WorkerStatus, None]:
        for gap in (0.02, 0.02, 0.25, 0.02, 0.02):
            yield WorkerStatus("decode", 10, 10, 0, 0, 0, True)
            await asyncio.sleep(gap)
        yield WorkerStatus("decode", 10, 10, 0, 0, 0, True)
        await asyncio.Event().wait()


def test_a_link_with_stalls_gets_more_time_but_a_hang_is_still_found() -> None:
    asyncio.run(_a_link_with_stalls_gets_more_time_but_a_hang_is_still_found())


async def _a_link_with_stalls_gets_more_time_but_a_hang_is_still_found() -> None:
    client = StallingClient("d0")
    tier = TierRegistry("decode", [], cast(Any, lambda a: client), stale_after_s=0.3)
    entry = WorkerEntry(cast(Any, client), tier.clock.now)
    tier.add_entry(entry)
    task = asyncio.create_task(tier._follow(entry))
    try:
        while len(entry.gaps) < 5:
            await asyncio.sleep(0.005)
        last = entry.load_at
        await asyncio.sleep(0.5)  # past stale_after_s, within 3 x the 0.25 s stall seen
        assert not client.abandoned and entry.state is WorkerState.SERVING
        while not client.abandoned:
            await asyncio.sleep(0.01)
        assert tier.clock.now() - last < 3 * 0.25 + 0.2
        assert entry.state is WorkerState.DOWN
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
