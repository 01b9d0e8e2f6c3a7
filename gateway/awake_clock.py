"""A clock of the gateway's own awake time, for judging its workers' silence.

A worker is declared hung when its load stream says nothing for ``stale_after_s``. Measured on
the monotonic clock, a gateway that was itself not running (SIGSTOPped, starved of CPU, its
event loop blocked) would find every worker silent for as long as it was away, mark the whole
fleet down and fail its next requests UNAVAILABLE, while the workers' reports sat unread in
its sockets. :class:`AwakeClock` is monotonic time minus the spans the event loop did not run:
a ticker wakes every ``tick_s``; a wake-up later than ``tick_s + slack_s`` counts the excess as
a pause. While a pause is still under way (or the loop is back but the ticker has not run yet),
:meth:`now` stands still. Invariants: :meth:`now` never goes backwards, advances like the
monotonic clock while the loop keeps time, and, without a running ticker, is the monotonic
clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import suppress

import structlog

log = structlog.get_logger(__name__)

LOG_PAUSE_S = 1.0  # pauses at least this long are logged (shorter ones are scheduling noise)


class AwakeClock:
    def __init__(
        self,
        tick_s: float = 0.1,
        slack_s: float = 0.25,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tick_s = tick_s
        self.slack_s = slack_s
        self._monotonic = monotonic
        self._paused_s = 0.0
        self._last_tick = monotonic()
        self._task: asyncio.Task[None] | None = None

    @property
    def paused_s(self) -> float:
        """Time the event loop is known not to have run, in all."""
        return self._paused_s

    def now(self) -> float:
        t = self._monotonic()
        if self._task is None:
            return t - self._paused_s
        return t - self._paused_s - max(0.0, self._overdue(t))

    def start(self) -> None:
        """Start the ticker (inside the event loop); a second call does nothing."""
        if self._task is None:
            self._last_tick = self._monotonic()
            self._task = asyncio.create_task(self._tick_forever())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task

    def tick(self) -> float:
        """Account for the time since the last tick; returns the pause it found (0 if none)."""
        t = self._monotonic()
        pause = max(0.0, self._overdue(t))
        self._paused_s += pause
        self._last_tick = t
        return pause

    def _overdue(self, t: float) -> float:
        return t - self._last_tick - self.tick_s - self.slack_s

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            pause = self.tick()
            if pause >= LOG_PAUSE_S:
                log.warning("gateway_paused", paused_s=round(pause, 3))
