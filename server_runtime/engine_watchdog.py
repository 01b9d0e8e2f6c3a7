"""Crash-only handling of a worker whose engine thread is stuck while its gRPC loop lives.

A deadlocked kernel, a CUDA hang or an op that never returns stops the engine thread inside a
step, while the event loop goes on answering health checks and load reports: the gateway would
keep routing to the worker and its streams would stall until each client's deadline. A thread
cannot be killed, so the process must go (its supervisor, ``pdserve up`` or the kubelet, starts
it again)::

    the engine moves (a step begins, a layer finishes)  -> all well
    busy (a step under way, or work waiting for one),
      no move for ``timeout_s``                         -> engine_stalled (log, with the engine
                                                           thread's Python stack)
      -> drain: new work refused UNAVAILABLE, load reports ``serving=false``, health NOT_SERVING
      -> every call in flight ends UNAVAILABLE "engine stalled" (the gateway retries it on
         another worker, resuming a stream after its last token)
      -> at most ``STATUS_GRACE_S`` for those statuses to go out
      -> os._exit(EXIT_ENGINE_STALLED)   (the stuck thread cannot be joined)

:class:`StallJudge` is the decision, on plain snapshots and a given clock (no threads). Time is
the watchdog's own awake time: each tick credits at most ``tick_s + slack_s``, so a process that
was itself not running (SIGSTOP, a suspended VM, starved of CPU) does not blame its engine for
the gap. An engine thread that died of an exception is judged stalled at once.

:class:`EngineWatchdog` runs the judge on a thread of its own, not on the event loop: it still
acts when the loop is blocked (on the engine's lock, held by a thread stuck inside it). Its
reporter thread is started up front, so acting on a stall creates no thread.

The backstop, for when no Python thread can run: a stuck thread that holds the GIL, or a lock
another thread waits on while holding the GIL (glibc's malloc arena lock: any allocation), stops
the whole interpreter, watchdog included; the worker's load stream falls silent and the gateway
(``--stale-after``) routes around it, but the process would hang forever. So every tick re-arms
the process's real-time timer (``setitimer``: one system call, nothing allocated) to
:func:`backstop_for` the timeout; a tick that never comes lets SIGALRM end the process (its
default action), after faulthandler wrote every thread's traceback to stderr. The supervisor
sees the exit as ``SIGALRM``. A whole-process pause (SIGSTOP) longer than the backstop ends the
worker when it resumes. Only a worker process arms it (:func:`start_engine_watchdog`).
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NamedTuple

import structlog

from core.errors import EngineStoppedError

if TYPE_CHECKING:  # (at run time the module imports no torch: a backstop test starts fast)
    from engine.async_engine import AsyncEngine
    from engine.engine_thread import StepSnapshot
    from server_runtime.grpc_runtime import ServerHandle

log = structlog.get_logger(__name__)

EXIT_ENGINE_STALLED = 70
"""The worker's exit status when its engine stalled (``EX_SOFTWARE`` of sysexits.h)."""
STATUS_GRACE_S = 1.0
"""At most this long for the calls' UNAVAILABLE statuses to go out before the exit."""
EXIT_SLACK_S = 1.0
"""Beyond the grace, what the reporting may take before the process exits regardless."""
BACKSTOP_SLACK_S = 1.0
"""Beyond the timeout, the grace and the slack: when SIGALRM ends a worker nothing else ended."""
_FLUSH_S = 0.1  # after the last call ended, for its status to leave the socket
_STACK_FRAMES = 12  # of the engine thread, on the engine_stalled line


class EngineStalledError(EngineStoppedError):
    """The engine made no progress for too long: every call in flight ends with it
    (UNAVAILABLE, as an :class:`~core.errors.EngineStoppedError`)."""


class Stall(NamedTuple):
    """Why the engine is judged stalled."""

    reason: str
    quiet_s: float
    """Awake seconds since the engine last moved."""
    snapshot: StepSnapshot

    def log_fields(self, now: float) -> dict[str, object]:
        snap = self.snapshot
        return {
            "reason": self.reason,
            "quiet_s": round(self.quiet_s, 3),
            "step_age_s": None if snap.started_at is None else round(now - snap.started_at, 3),
            "step": snap.steps,
            "last_layer": snap.layer,
            "seqs": snap.seqs,
            "tokens": snap.tokens,
            "request_ids": list(snap.request_ids),
        }


class StallJudge:
    """Decides, from a snapshot taken every tick, whether the engine is stalled."""

    def __init__(self, timeout_s: float, tick_s: float, slack_s: float, now: float) -> None:
        self.timeout_s = timeout_s
        self.tick_s = tick_s
        self.slack_s = slack_s
        self._last_tick = now
        self._moves: int | None = None  # the move last seen while the engine was busy
        self._quiet_s = 0.0

    @property
    def quiet_s(self) -> float:
        """Awake seconds the busy engine has gone without moving (0 while idle)."""
        return self._quiet_s

    def observe(self, snap: StepSnapshot, now: float) -> Stall | None:
        """Account for the tick at ``now`` (monotonic) that found ``snap``; a :class:`Stall`
        once the engine died or has not moved for ``timeout_s`` of awake time."""
        credit = min(max(0.0, now - self._last_tick), self.tick_s + self.slack_s)
        self._last_tick = now
        if snap.died is not None:
            return Stall(f"engine thread died: {snap.died}", self._quiet_s, snap)
        if snap.moved_at is None:  # idle: no step under way, no work waiting
            self._moves, self._quiet_s = None, 0.0
            return None
        if snap.moves != self._moves:  # moved since the last tick: quiet since then at most
            self._moves = snap.moves
            self._quiet_s = min(max(0.0, now - snap.moved_at), credit)
        else:
            self._quiet_s += credit
        if self._quiet_s >= self.timeout_s:
            return Stall("no progress", self._quiet_s, snap)
        return None


def tick_for(timeout_s: float) -> float:
    """How often to look: a sixth of the timeout, between 0.05 and 0.5 s."""
    return min(0.5, max(0.05, timeout_s / 6))


def backstop_for(timeout_s: float) -> float:
    """How long without a tick before SIGALRM ends the process: longer than a stall takes to
    end it the ordinary way (the timeout, then the grace and the slack)."""
    return timeout_s + STATUS_GRACE_S + EXIT_SLACK_S + BACKSTOP_SLACK_S


def arm_backstop(seconds: float) -> None:
    """SIGALRM in ``seconds`` (0: never), replacing the previous arming (any thread)."""
    signal.setitimer(signal.ITIMER_REAL, seconds)


def install_backstop() -> None:
    """Before SIGALRM ends the process, every thread's traceback goes to stderr (faulthandler's
    handler runs without the GIL, then the default action). Main thread, once per process."""
    if signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, None):
        raise RuntimeError("SIGALRM has a handler: the watchdog's backstop needs its default")
    faulthandler.register(signal.SIGALRM, file=sys.stderr, all_threads=True, chain=True)


def thread_stack(thread: threading.Thread | None, limit: int = _STACK_FRAMES) -> list[str]:
    """The innermost ``limit`` frames of ``thread``'s Python stack, innermost last."""
    frame = sys._current_frames().get(thread.ident) if thread and thread.ident else None
    if frame is None:
        return []
    frames = traceback.StackSummary.extract(
        traceback.walk_stack(frame), limit=limit, lookup_lines=False
    )
    return [f"{f.filename}:{f.lineno} {f.name}" for f in reversed(frames)]


class EngineWatchdog:
    """Runs a :class:`StallJudge` on its own thread; calls ``on_stall`` once (on that thread).
    With ``arm`` (:func:`arm_backstop`), each tick re-arms the backstop and :meth:`stop`
    disarms it; a stall arms it one last time, for what the ordinary exit may take."""

    def __init__(
        self,
        snapshot: Callable[[], StepSnapshot],
        timeout_s: float,
        on_stall: Callable[[Stall], None],
        *,
        arm: Callable[[float], None] | None = None,
        slack_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._snapshot = snapshot
        self._on_stall = on_stall
        self._arm = arm
        self._clock = clock
        self.tick_s = tick_for(timeout_s)
        self.backstop_s = backstop_for(timeout_s)
        self.judge = StallJudge(timeout_s, self.tick_s, slack_s, clock())
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdserve-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """No more judging (the worker stops as asked); a stall already acted on goes on."""
        self._stopped.set()
        self._thread.join(2 * self.tick_s)
        if self._arm is not None:
            self._arm(0)

    def _run(self) -> None:
        while not self._stopped.wait(self.tick_s):
            if self._arm is not None:
                self._arm(self.backstop_s)
            stall = self.judge.observe(self._snapshot(), self._clock())
            if stall is not None and not self._stopped.is_set():
                if self._arm is not None:  # in case the ordinary exit never comes
                    self._arm(STATUS_GRACE_S + EXIT_SLACK_S + BACKSTOP_SLACK_S)
                self._on_stall(stall)
                return


class CrashOnStall:
    """What a worker does once its engine stalled (see the module docstring): logs, has the
    event loop stop serving and fail the calls, then exits with :data:`EXIT_ENGINE_STALLED`.
    Its reporter thread starts with it and waits for a stall."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        engine: AsyncEngine,
        handle: ServerHandle,
        services: Iterable[str],
        *,
        engine_thread: threading.Thread | None = None,
        exit: Callable[[int], object] = os._exit,
    ) -> None:
        self.loop = loop
        self.engine = engine
        self.handle = handle
        self.services = list(services)
        self.engine_thread = engine_thread
        self._exit = exit
        self._stall: Stall | None = None
        self._stalled = threading.Event()
        self._reported = threading.Event()
        threading.Thread(target=self._report, name="pdserve-stall", daemon=True).start()

    def __call__(self, stall: Stall) -> None:
        self._stall = stall
        self._stalled.set()
        self._reported.wait(STATUS_GRACE_S + EXIT_SLACK_S)  # whatever holds it up, we go
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        self._exit(EXIT_ENGINE_STALLED)

    def _report(self) -> None:
        self._stalled.wait()
        stall = self._stall
        assert stall is not None
        try:
            self._fail_calls(stall)
        finally:
            self._reported.set()

    def _fail_calls(self, stall: Stall) -> None:
        log.error(
            "engine_stalled",
            exit_code=EXIT_ENGINE_STALLED,
            **stall.log_fields(time.monotonic()),
            stack=thread_stack(self.engine_thread),
        )
        error = EngineStalledError(
            f"engine stalled: no progress for {stall.quiet_s:.1f} s ({stall.reason}); "
            "the worker is restarting"
        )
        future = asyncio.run_coroutine_threadsafe(self.stop_serving(error), self.loop)
        try:
            failed = future.result(STATUS_GRACE_S + _FLUSH_S)
        except Exception as exc:  # the loop is blocked (or gone): exit all the same
            log.error("engine_stalled_calls_not_failed", error=repr(exc))
            return
        log.info("engine_stalled_calls_failed", calls=failed, left=self.handle.lifecycle.in_flight)

    async def stop_serving(self, error: EngineStalledError) -> int:
        """On the event loop: refuse new work, NOT_SERVING, end every call in flight with
        ``error``, and wait (briefly) for their statuses to go out. Returns the calls ended."""
        self.handle.lifecycle.drain()  # load reports say serving=false from now on
        await self.handle.set_serving(self.services, False)
        failed = self.engine.fail_requests(error)
        await self.handle.lifecycle.wait_idle(STATUS_GRACE_S)
        await asyncio.sleep(_FLUSH_S)
        return failed


def start_engine_watchdog(
    engine: AsyncEngine, handle: ServerHandle, services: Iterable[str]
) -> EngineWatchdog | None:
    """Watch ``engine``, with the SIGALRM backstop (call on the event loop, in the main thread,
    after the engine started); None when its ``step_timeout_s`` is 0 (off)."""
    timeout_s = engine.config.step_timeout_s
    if timeout_s <= 0:
        return None
    install_backstop()
    crash = CrashOnStall(
        asyncio.get_running_loop(), engine, handle, services, engine_thread=engine.monitor.thread
    )
    watchdog = EngineWatchdog(engine.monitor.snapshot, timeout_s, crash, arm=arm_backstop)
    watchdog.start()
    log.info(
        "engine_watchdog_started",
        step_timeout_s=timeout_s,
        tick_s=watchdog.tick_s,
        backstop_s=watchdog.backstop_s,
    )
    return watchdog
