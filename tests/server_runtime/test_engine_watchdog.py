"""The engine watchdog's decision on a fake clock (no model, no threads): idle is never a stall,
a step that stops moving is one after ``timeout_s`` of awake time and not before, a slow step
that keeps finishing layers is not, a pause of the whole process is not the engine's fault, a
dead engine thread is a stall at once; then the watchdog's thread calls its action once, not
after ``stop``, re-arming the backstop each tick; the action drains, turns NOT_SERVING, fails
the calls, logs the engine thread's stack and exits 70, also when the event loop is blocked;
and a process whose interpreter freezes is ended by the backstop (SIGALRM, every thread's
traceback on stderr)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from typing import NamedTuple

import pytest
from structlog.testing import capture_logs

from engine.engine_thread import StepSnapshot
from server_runtime.engine_watchdog import (
    BACKSTOP_SLACK_S,
    EXIT_ENGINE_STALLED,
    EXIT_SLACK_S,
    STATUS_GRACE_S,
    CrashOnStall,
    EngineStalledError,
    EngineWatchdog,
    Stall,
    StallJudge,
    backstop_for,
    thread_stack,
    tick_for,
)
from server_runtime.grpc_runtime import BASE_STATUS_CODES, Lifecycle, status_for

TIMEOUT_S, TICK_S, SLACK_S = 3.0, 0.5, 0.25

IDLE = StepSnapshot(
    steps=4, started_at=None, moves=40, moved_at=None, layer=None, seqs=0, tokens=0,
    request_ids=(), thread_alive=True, died=None,
)  # fmt: skip


def _in_step(moves: int, moved_at: float, started_at: float = 0.0) -> StepSnapshot:
    return IDLE._replace(
        steps=5, started_at=started_at, moves=moves, moved_at=moved_at, layer=3, seqs=8,
        tokens=8, request_ids=("a#1", "b#2"),
    )  # fmt: skip


def _judge(now: float = 0.0) -> StallJudge:
    return StallJudge(TIMEOUT_S, TICK_S, SLACK_S, now)


def _ticks(judge: StallJudge, snap: StepSnapshot, start: float, count: int) -> list[Stall | None]:
    return [judge.observe(snap, start + TICK_S * i) for i in range(1, count + 1)]


def test_an_idle_engine_is_never_stalled() -> None:
    judge = _judge()
    assert _ticks(judge, IDLE, 0.0, 1000) == [None] * 1000  # 500 s between steps
    assert judge.quiet_s == 0.0


def test_a_step_that_stops_moving_is_a_stall_after_the_timeout_and_not_before() -> None:
    judge = _judge()
    stuck = _in_step(moves=41, moved_at=0.1, started_at=0.1)
    verdicts = _ticks(judge, stuck, 0.0, 7)  # ticks at 0.5 .. 3.5 s
    assert verdicts[:6] == [None] * 6  # quiet 0.4 .. 2.9 s
    stall = verdicts[6]
    assert stall is not None and stall.reason == "no progress"
    assert stall.quiet_s == pytest.approx(3.4)
    fields = stall.log_fields(now=3.5)
    assert fields["step_age_s"] == pytest.approx(3.4) and fields["last_layer"] == 3
    assert (fields["seqs"], fields["tokens"], fields["request_ids"]) == (8, 8, ["a#1", "b#2"])


def test_a_slow_step_that_keeps_finishing_layers_is_not_a_stall() -> None:
    judge = _judge()
    for i in range(1, 240):  # a 120 s step that finishes a layer every 1.5 s
        now = TICK_S * i
        moved = int(now / 1.5)
        assert judge.observe(_in_step(moves=41 + moved, moved_at=moved * 1.5), now) is None
    assert judge.quiet_s <= 1.5


def test_a_new_step_resets_the_quiet_time() -> None:
    judge = _judge()
    assert _ticks(judge, _in_step(41, 0.0), 0.0, 5) == [None] * 5  # quiet 2.5 s
    assert judge.observe(IDLE, 3.0) is None and judge.quiet_s == 0.0
    assert judge.observe(_in_step(51, 3.2, started_at=3.2), 3.5) is None
    assert judge.quiet_s == pytest.approx(0.3)


def test_a_pause_of_the_whole_process_is_not_blamed_on_the_engine() -> None:
    judge = _judge()
    stuck = _in_step(moves=41, moved_at=0.0)
    assert judge.observe(stuck, 0.5) is None
    assert judge.observe(stuck, 100.5) is None  # SIGSTOPped for 100 s: one tick's credit
    assert judge.quiet_s == pytest.approx(0.5 + TICK_S + SLACK_S)
    verdicts = _ticks(judge, stuck, 100.5, 4)  # it goes on counting once awake
    assert verdicts[:3] == [None] * 3 and verdicts[3] is not None


def test_a_step_first_seen_long_after_its_last_move_counts_one_tick_at_most() -> None:
    judge = _judge(now=50.0)
    judge.observe(IDLE, 50.5)
    assert judge.observe(_in_step(41, moved_at=1.0), 51.0) is None  # (the process was paused)
    assert judge.quiet_s == pytest.approx(TICK_S)


def test_a_dead_engine_thread_is_a_stall_at_once() -> None:
    dead = IDLE._replace(thread_alive=False, died="RuntimeError: boom")
    stall = _judge().observe(dead, 0.5)
    assert stall is not None and stall.reason == "engine thread died: RuntimeError: boom"


def test_the_tick_is_a_sixth_of_the_timeout_within_bounds() -> None:
    assert (tick_for(60), tick_for(3), tick_for(0.12)) == (0.5, 0.5, 0.05)
    assert tick_for(1.2) == pytest.approx(0.2)


def test_a_stalled_call_ends_unavailable() -> None:
    import grpc

    error = EngineStalledError("engine stalled")
    assert status_for(error, BASE_STATUS_CODES) is grpc.StatusCode.UNAVAILABLE


def test_the_watchdog_thread_acts_once_on_a_stall_and_never_after_stop() -> None:
    started = time.monotonic()
    stuck = _in_step(moves=41, moved_at=started, started_at=started)
    stalls: list[Stall] = []
    acted = threading.Event()

    def on_stall(stall: Stall) -> None:
        stalls.append(stall)
        acted.set()

    armed: list[float] = []
    watchdog = EngineWatchdog(lambda: stuck, 0.3, on_stall, arm=armed.append)
    watchdog.start()
    assert acted.wait(5)
    elapsed = time.monotonic() - started
    time.sleep(0.3)
    assert len(stalls) == 1 and 0.3 <= elapsed < 3.0, elapsed
    backstop = backstop_for(0.3)
    assert watchdog.backstop_s == backstop == 0.3 + STATUS_GRACE_S + EXIT_SLACK_S + BACKSTOP_SLACK_S
    ticks, last = armed[:-1], armed[-1]
    assert len(ticks) >= 2 and set(ticks) == {backstop}  # every tick re-armed it
    assert last == STATUS_GRACE_S + EXIT_SLACK_S + BACKSTOP_SLACK_S  # for the exit itself

    armed.clear()
    quiet = EngineWatchdog(lambda: stuck, 0.3, on_stall, arm=armed.append)
    quiet.start()
    time.sleep(0.12)
    quiet.stop()  # the worker stops as asked: a step left hanging then is no stall
    time.sleep(0.6)
    assert len(stalls) == 1
    assert armed[-1] == 0 and set(armed[:-1]) <= {backstop}  # disarmed, and left so


class FakeEngine:
    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle
        self.failed: list[BaseException] = []

    def fail_requests(self, error: BaseException) -> int:
        self.failed.append(error)
        self.lifecycle.leave()  # the one call in flight ends (its status goes out)
        return 1


class FakeHandle:
    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle
        self.serving: list[tuple[list[str], bool]] = []

    async def set_serving(self, services: Iterable[str], serving: bool) -> None:
        self.serving.append((list(services), serving))


class Crashed(NamedTuple):
    exits: list[tuple[int, float]]
    """(status, monotonic time) of each exit called."""
    engine: FakeEngine
    handle: FakeHandle
    logs: list
    loop_back_at: float
    """When the event loop ran again (after ``block_loop_s``)."""


def _crash_on_loop(block_loop_s: float = 0.0) -> Crashed:
    exits: list[tuple[int, float]] = []
    loop_back_at = [0.0]
    stall = Stall("no progress", 3.2, _in_step(41, 0.0))

    async def serve() -> tuple[FakeEngine, FakeHandle, list]:
        lifecycle = Lifecycle(max_in_flight=4)
        await lifecycle.enter()  # a call in flight
        engine, handle = FakeEngine(lifecycle), FakeHandle(lifecycle)
        crash = CrashOnStall(
            asyncio.get_running_loop(),
            engine,  # type: ignore[arg-type]
            handle,  # type: ignore[arg-type]
            ["pdserve.v1.Decode"],
            engine_thread=stuck_engine,
            exit=lambda code: exits.append((code, time.monotonic())),
        )
        with capture_logs() as logs:
            acting = threading.Thread(target=crash, args=(stall,))
            acting.start()
            if block_loop_s:
                time.sleep(block_loop_s)  # the loop cannot run (blocked on the engine's lock)
            loop_back_at[0] = time.monotonic()
            while acting.is_alive():
                await asyncio.sleep(0.01)
        return engine, handle, logs

    release = threading.Event()
    stuck_engine = threading.Thread(target=_stuck_kernel, args=(release,), daemon=True)
    stuck_engine.start()
    try:
        engine, handle, logs = asyncio.run(serve())
    finally:
        release.set()
    return Crashed(exits, engine, handle, logs, loop_back_at[0])


def _stuck_kernel(release: threading.Event) -> None:
    release.wait(30)


def test_a_stall_drains_turns_not_serving_fails_the_calls_and_exits_70() -> None:
    exits, engine, handle, logs, _ = _crash_on_loop()
    assert [code for code, _ in exits] == [EXIT_ENGINE_STALLED] == [70]
    assert handle.lifecycle.draining  # load reports say serving=false; new work UNAVAILABLE
    assert handle.serving == [(["pdserve.v1.Decode"], False)]
    assert len(engine.failed) == 1 and isinstance(engine.failed[0], EngineStalledError)
    assert str(engine.failed[0]).startswith("engine stalled")
    events = [e["event"] for e in logs]
    assert events == ["engine_stalled", "engine_stalled_calls_failed"]
    assert logs[0]["quiet_s"] == 3.2 and logs[0]["exit_code"] == 70 and logs[1]["calls"] == 1
    stack = logs[0]["stack"]  # where the engine thread is stuck, innermost last
    assert stack[-1].endswith(" wait") and any(f.endswith(" _stuck_kernel") for f in stack)


def test_a_stall_exits_even_while_the_event_loop_is_blocked() -> None:
    crashed = _crash_on_loop(block_loop_s=STATUS_GRACE_S + EXIT_SLACK_S + 1.0)
    [(code, at)] = crashed.exits
    assert code == 70 and at < crashed.loop_back_at  # it did not wait for the loop
    logs = crashed.logs
    assert [e["event"] for e in logs] == ["engine_stalled", "engine_stalled_calls_not_failed"]


def test_the_stack_of_a_thread_that_is_not_running_is_empty() -> None:
    assert thread_stack(None) == [] and thread_stack(threading.Thread(target=print)) == []


FROZEN = """
import ctypes, sys, threading, types
from server_runtime.engine_watchdog import EngineWatchdog, arm_backstop, install_backstop

busy = types.SimpleNamespace(died=None, moved_at=0.0, moves=1)
install_backstop()
EngineWatchdog(lambda: busy, 0.5, lambda stall: None, arm=arm_backstop).start()
threading.Event().wait(0.3)  # a few ticks
print("frozen", flush=True)
ctypes.PyDLL(None).sleep(60)  # C code that keeps the GIL: no Python thread runs any more
print("not reached", flush=True)
"""


def test_a_frozen_interpreter_is_ended_by_the_backstop_with_every_threads_traceback() -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", FROZEN], capture_output=True, text=True, timeout=60
    )
    took = time.monotonic() - started
    assert proc.returncode == -signal.SIGALRM, (proc.returncode, proc.stderr)
    assert proc.stdout.split() == ["frozen"]
    assert "Current thread" in proc.stderr and "in _run" in proc.stderr  # the watchdog's too
    assert took < backstop_for(0.5) + 15, took  # (interpreter start-up included)
