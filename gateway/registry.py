"""The gateway's live view of each tier: which workers exist, which may take work, how loaded.

A :class:`TierRegistry` expands its targets (:mod:`gateway.discovery`) into worker addresses and
follows each worker's health and load streams (:class:`~gateway.worker_entry.WorkerEntry`). A
worker is routable only while SERVING with a load report younger than its allowed silence
(``stale_after_s``, see below). A worker whose load stream falls silent that long (hung, say
SIGSTOPped) is marked DOWN and its calls in
flight are abandoned, so failover resumes them elsewhere (:meth:`TierRegistry._read_load`).
Silence is measured on the gateway's own awake time (:mod:`gateway.awake_clock`): a gateway that
was itself stopped or starved does not blame its workers for the gap. On a link whose reports
come late anyway (loss: TCP retransmission stalls of 0.6-2 s on a 200 ms path), the silence
allowed grows with what the worker's recent gaps showed (``WorkerEntry.allowed_silence``).
An address that leaves DNS is retired: no new work, its calls in flight finish, then its
channel closes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from contextlib import suppress

import structlog

from gateway.awake_clock import AwakeClock
from gateway.discovery import Resolver, Target, addresses_of, resolve_with_getaddrinfo
from gateway.worker_clients import WorkerClient, WorkerStatus
from gateway.worker_entry import WorkerEntry

log = structlog.get_logger(__name__)

RETRY_MIN_S = 0.05
RETRY_MAX_S = 1.0


class WorkerSilentError(Exception):
    """A worker's load stream sent nothing for ``stale_after_s`` after its first report."""


class TierRegistry:
    """The workers of one tier: its targets resolved into addresses (DNS names again every
    ``resolve_interval_s``), one task following each worker (:meth:`_follow`), the routable set."""

    def __init__(
        self,
        tier: str,
        targets: Sequence[str],
        make_client: Callable[[str], WorkerClient],
        *,
        load_interval_ms: int = 250,
        stale_after_s: float = 1.5,
        resolve_interval_s: float = 5.0,
        resolve: Resolver = resolve_with_getaddrinfo,
        clock: AwakeClock | None = None,
    ) -> None:
        self.tier = tier
        self.clock = clock or AwakeClock()
        self.targets = [Target.parse(t) for t in targets]
        self._make_client = make_client
        self.load_interval_ms = load_interval_ms
        self.stale_after_s = stale_after_s
        self.resolve_interval_s = resolve_interval_s
        self._resolve = resolve
        self.entries: dict[str, WorkerEntry] = {}
        self._retired: list[WorkerEntry] = []
        self._by_target: dict[Target, set[str]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._resolver_task: asyncio.Task[None] | None = None

    @property
    def configured(self) -> bool:
        return bool(self.targets)

    async def start(self) -> None:
        self.clock.start()
        await self.refresh()
        if any(t.dns for t in self.targets):
            self._resolver_task = asyncio.create_task(self._resolve_forever())

    def add_entry(self, entry: WorkerEntry) -> None:
        """Track a worker (tests hand in entries whose client is a fake)."""
        self.entries[entry.address] = entry

    async def refresh(self) -> None:
        """Resolve every target again; follow new addresses, retire vanished ones."""
        for target in self.targets:
            found = await addresses_of(target, self._resolve)
            if found is not None:
                self._by_target[target] = found
        wanted = set().union(*self._by_target.values()) if self._by_target else set()
        for address in sorted(wanted - self.entries.keys()):
            entry = WorkerEntry(self._make_client(address), self.clock.now)
            self.entries[address] = entry
            self._tasks[address] = asyncio.create_task(self._follow(entry))
            log.info("worker_discovered", tier=self.tier, address=address)
        for address in sorted(self.entries.keys() - wanted):
            await self._retire(self.entries.pop(address))

    async def _retire(self, entry: WorkerEntry) -> None:
        log.info("worker_retired", tier=self.tier, address=entry.address, active=entry.active)
        entry.retired = True
        task = self._tasks.pop(entry.address, None)
        if task is not None:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        self._retired.append(entry)
        await self._close_idle_retired()

    async def _close_idle_retired(self) -> None:
        for entry in [e for e in self._retired if e.active == 0]:
            self._retired.remove(entry)
            await entry.client.close()

    async def _resolve_forever(self) -> None:
        while True:
            await asyncio.sleep(self.resolve_interval_s)
            try:
                await self.refresh()
            except Exception as exc:  # keep following what we have
                log.warning("worker_refresh_failed", tier=self.tier, error=str(exc))

    async def _follow(self, entry: WorkerEntry) -> None:
        """Follow one worker's health and load until cancelled, reconnecting with backoff."""
        backoff = RETRY_MIN_S
        while True:
            heard = asyncio.Event()
            streams = [
                asyncio.create_task(self._read_load(entry, heard)),
                asyncio.create_task(self._read_health(entry)),
            ]
            try:
                done, _ = await asyncio.wait(streams, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in streams:
                    task.cancel()
                await asyncio.gather(*streams, return_exceptions=True)
            reason = "stream ended"
            silent = False
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    reason = str(task.exception())
                    silent = silent or isinstance(task.exception(), WorkerSilentError)
            entry.on_down(reason)
            if silent:
                abandoned = entry.client.abandon_calls(reason)
                log.warning(
                    "worker_silent",
                    tier=self.tier,
                    address=entry.address,
                    reason=reason,
                    calls_abandoned=abandoned,
                )
            backoff = RETRY_MIN_S if heard.is_set() else min(backoff * 2, RETRY_MAX_S)
            await self._close_idle_retired()
            await asyncio.sleep(backoff)

    async def _read_load(self, entry: WorkerEntry, heard: asyncio.Event) -> None:
        """Follow the load stream; after its first report, a gap of ``stale_after_s`` raises
        :class:`WorkerSilentError` (the worker is hung: its connection is up, it says nothing).
        The first report may take longer (a worker starting, or still stopped)."""
        loads = entry.client.watch_load(self.load_interval_ms)
        pending: asyncio.Future[WorkerStatus] | None = None
        try:
            while True:
                pending = asyncio.ensure_future(anext(loads))
                if heard.is_set():
                    await self._until_report_or_silence(entry, pending)
                try:
                    load = await pending
                except StopAsyncIteration:
                    return
                heard.set()
                entry.on_load(load)
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
            await loads.aclose()

    async def _until_report_or_silence(
        self, entry: WorkerEntry, pending: asyncio.Future[WorkerStatus]
    ) -> None:
        """Wait for ``pending`` (the next load report); raise :class:`WorkerSilentError` once
        the worker has been silent for its allowed silence (``stale_after_s``, more on a link
        that showed long gaps) of this gateway's awake time."""
        while not pending.done():
            allowed = entry.allowed_silence(self.stale_after_s)
            silent_s = self.clock.now() - entry.load_at
            if silent_s >= allowed:
                raise WorkerSilentError(
                    f"{self.tier} worker {entry.address} sent no load report for {allowed:.1f} s"
                )
            await asyncio.wait({pending}, timeout=allowed - silent_s)

    async def _read_health(self, entry: WorkerEntry) -> None:
        async for serving in entry.client.watch_health():
            entry.on_health(serving)

    def routable(self) -> list[WorkerEntry]:
        now = self.clock.now()
        return [e for e in self.entries.values() if e.routable(now, self.stale_after_s)]

    def summary(self) -> str:
        """For error messages: e.g. "2 known: 1 down, 1 draining"."""
        counts: dict[str, int] = {}
        for entry in self.entries.values():
            counts[entry.state.value] = counts.get(entry.state.value, 0) + 1
        parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        return f"{len(self.entries)} known" + (f": {parts}" if parts else "")

    async def release(self, entry: WorkerEntry) -> None:
        entry.release()
        if entry.retired and entry.active == 0:
            await self._close_idle_retired()

    async def close(self) -> None:
        await self.clock.stop()
        if self._resolver_task is not None:
            self._resolver_task.cancel()
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(
            *self._tasks.values(),
            *([self._resolver_task] if self._resolver_task else []),
            return_exceptions=True,
        )
        for entry in [*self.entries.values(), *self._retired]:
            await entry.client.close()
        self.entries.clear()
        self._retired.clear()


class Registry:
    """Both tiers."""

    def __init__(self, prefill: TierRegistry, decode: TierRegistry) -> None:
        self.prefill = prefill
        self.decode = decode

    async def start(self) -> None:
        await self.prefill.start()
        await self.decode.start()

    async def close(self) -> None:
        await self.prefill.close()
        await self.decode.close()

    async def wait_ready(
        self, prefill_wait_s: float = 60.0, settle_s: float = 3.0, poll_s: float = 0.05
    ) -> None:
        """Until a decode worker is routable, and a prefill worker too when the tier is
        configured (for at most ``prefill_wait_s`` beyond the decode tier: without one, prompts
        prefill on decode workers); then up to ``settle_s`` more for every known worker, so
        that the first requests spread over the whole fleet."""
        while not self.decode.routable():
            await asyncio.sleep(poll_s)
        deadline = time.monotonic() + prefill_wait_s
        while (
            self.prefill.configured and not self.prefill.routable() and time.monotonic() < deadline
        ):
            await asyncio.sleep(poll_s)
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline and any(
            len(tier.routable()) < len(tier.entries) for tier in (self.prefill, self.decode)
        ):
            await asyncio.sleep(poll_s)
        log.info(
            "fleet_ready",
            decode=len(self.decode.routable()),
            prefill=len(self.prefill.routable()),
        )
