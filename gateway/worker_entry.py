"""One worker as the gateway sees it: its state (from its health and load streams), its last
load report, this gateway's calls on it, and how long it may stay silent before it counts as
hung. Followed and updated by :class:`gateway.registry.TierRegistry`.

Invariant: ``load_at`` and the report gaps are on the clock the entry was given (the gateway's
awake time, :mod:`gateway.awake_clock`); a new connection (after :meth:`WorkerEntry.on_down`)
learns its link's gaps afresh.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable

import structlog

from gateway.worker_clients import WorkerClient, WorkerStatus

log = structlog.get_logger(__name__)

GAP_HISTORY = 64  # load reports whose gaps set the silence allowed (16 s at 250 ms)
GAP_MARGIN = 3.0  # silence allowed: this many times the longest recent gap ...
MAX_SILENCE_FACTOR = 4.0  # ... but never more than this many times stale_after_s


class WorkerState(enum.Enum):
    """Where a worker stands, from two streams: ``grpc.health.v1.Health/Watch`` (SERVING or not)
    and the worker's ``WatchLoad`` (queue, batch, free blocks, every ``load_interval_ms``).

    CONNECTING until both streams have spoken, then SERVING, or DRAINING while either says it is
    not serving. A stream that breaks (the worker died, restarted, or went away) makes it DOWN,
    and both streams reconnect after a backoff (0.05 s doubling to 1 s); it leaves DOWN when both
    speak again. A worker killed outright resets its connections, so it leaves the routable set
    within milliseconds; a hung one goes DOWN once its last load report is ``stale_after_s``
    old, and this gateway's calls on it are abandoned (they fail over).
    """

    CONNECTING = "connecting"
    SERVING = "serving"
    DRAINING = "draining"
    DOWN = "down"


class WorkerEntry:
    """One worker as the gateway sees it. ``active`` counts this gateway's calls on it;
    ``assigned_since_load``/``released_since_load`` the calls routed to it and ended since its
    last load report, so routing corrects a report that is up to one interval old (a burst does
    not pile onto the worker that looked idle, nor avoid the one whose streams just ended)."""

    def __init__(self, client: WorkerClient, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self._clock = clock
        self.address = client.address
        self.tier = client.tier
        self.state = WorkerState.CONNECTING
        self.load: WorkerStatus | None = None
        self.load_at = 0.0
        self.gaps: deque[float] = deque(maxlen=GAP_HISTORY)
        """Time between this connection's recent load reports (awake time)."""
        self._longest_gap = 0.0  # max(gaps), kept with them: routing reads it per request
        self.health_serving: bool | None = None  # None: not heard yet
        self.active = 0
        self.assigned_since_load = 0
        self.released_since_load = 0
        self.retired = False
        self.state_since = time.monotonic()

    def routable(self, now: float, stale_after_s: float) -> bool:
        return (
            self.state is WorkerState.SERVING
            and not self.retired
            and now - self.load_at <= self.allowed_silence(stale_after_s)
        )

    def on_load(self, load: WorkerStatus) -> None:
        now = self._clock()
        if self.load is not None:
            self.gaps.append(now - self.load_at)
            self._longest_gap = max(self.gaps)
        self.load = load
        self.load_at = now
        self.assigned_since_load = self.released_since_load = 0
        self._settle()

    def on_health(self, serving: bool) -> None:
        self.health_serving = serving
        self._settle()

    def _settle(self) -> None:
        if self.load is None or self.health_serving is None:
            return  # both streams must have spoken
        serving = self.health_serving and self.load.serving
        self._move(WorkerState.SERVING if serving else WorkerState.DRAINING, "")

    def allowed_silence(self, stale_after_s: float) -> float:
        """How long this worker may go without a load report before it counts as hung:
        ``stale_after_s``, or ``GAP_MARGIN`` times the longest gap its recent reports showed
        when that is more (a slow or lossy link), capped at ``MAX_SILENCE_FACTOR`` times
        ``stale_after_s`` (a hang is still found)."""
        longest = self._longest_gap
        return min(max(stale_after_s, GAP_MARGIN * longest), MAX_SILENCE_FACTOR * stale_after_s)

    def on_down(self, reason: str) -> None:
        self.gaps.clear()  # a new connection learns its link afresh
        self._longest_gap = 0.0
        self.load = None
        self.health_serving = None
        self._move(WorkerState.DOWN, reason)

    def _move(self, state: WorkerState, reason: str) -> None:
        if state is self.state:
            return
        now = time.monotonic()
        log.info(
            f"worker_{state.value}",
            tier=self.tier,
            address=self.address,
            previous=self.state.value,
            after_s=round(now - self.state_since, 3),
            **({"reason": reason} if reason else {}),
        )
        self.state, self.state_since = state, now

    def assign(self) -> None:
        self.active += 1
        self.assigned_since_load += 1

    def release(self) -> None:
        self.active -= 1
        self.released_since_load += 1

    def batch(self) -> int:
        """Sequences on the worker: the last report corrected by what this gateway started and
        ended since; never fewer than this gateway's own calls."""
        reported = 0
        if self.load is not None:
            reported = self.load.running + self.load.waiting + self.load.awaiting_kv
        now = reported + self.assigned_since_load - self.released_since_load
        return max(now, self.active, 0)
