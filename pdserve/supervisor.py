"""Supervising ``pdserve up``'s children: start them, restart a worker that dies, give up on
one that crash-loops, and stop everything when the gateway dies.

Each child moves through :class:`ChildState`::

    start ──▶ STARTING ──(probe says SERVING)──▶ SERVING
                 │  ▲                               │
     exit, start │  └──── restart after delay ◀─────┤ exit
     timeout or  ▼                                  ▼
     port taken ─────────▶ BACKOFF ──(limit hit)──▶ GAVE_UP

Invariants:

* a worker comes back with the same command line, so on the same addresses: the gateway's
  static worker list reaches it again (the gateway reconnects to a worker whose streams broke);
* every port a child binds is checked before it starts (:func:`pdserve.ports.bind_error`):
  a taken port is reported at once and counts as a failed start, so it backs off and gives up
  like a crash loop, never silently and never with a half-started child;
* the restart delay doubles with each failure inside ``RestartPolicy.window_s`` (a worker
  that served for a whole window starts again from the first delay); the ``limit``-th + 1
  failure inside the window gives up on that worker, which stays down while the rest serve;
* the gateway's failure, any failure under ``fail_fast``, and the loss of every decode worker
  (unless the gateway also routes to decode workers started elsewhere) raise
  :class:`ClusterFailed`: the caller stops the cluster and exits non-zero;
* each exit, restart and give-up is a structlog event naming the worker, and is counted in
  :class:`pdserve.supervisor_metrics.SupervisorMetrics`.

The supervisor owns no thread and no clock loop: the caller calls :meth:`Supervisor.tick`
every few hundred milliseconds.
"""

from __future__ import annotations

import collections
import enum
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import structlog

from pdserve.ports import bind_error
from pdserve.supervisor_metrics import SupervisorMetrics

log = structlog.get_logger(__name__)

GATEWAY = "gateway"


class Bind(NamedTuple):
    """An address a child listens on (checked before the child starts)."""

    host: str
    port: int


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    address: str  # gRPC address, for the readiness check
    argv: tuple[str, ...]
    cpus: tuple[int, ...] = ()  # pinned by the launcher after start (the gateway has no flag)
    binds: tuple[Bind, ...] = ()  # every TCP address it listens on

    @property
    def role(self) -> str:
        """``gateway``, ``prefill`` or ``decode``."""
        return self.name.split("-")[0]


@dataclass(frozen=True)
class RestartPolicy:
    """When a worker that failed starts again, and when the supervisor stops trying."""

    delay_s: float = 0.5
    max_delay_s: float = 30.0
    limit: int = 5
    """Restarts allowed within ``window_s``; 0: never restart (one that dies stays down)."""
    window_s: float = 60.0

    def delay(self, recent: int) -> float | None:
        """The delay before the next start after ``recent`` restarts within the window, or None:
        give up (the limit is reached)."""
        if recent >= self.limit:
            return None
        return float(min(self.max_delay_s, self.delay_s * 2**recent))


class ChildState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    BACKOFF = "backoff"
    GAVE_UP = "gave_up"


class ClusterFailed(RuntimeError):
    """The cluster cannot go on (the gateway failed, ``fail_fast``, no decode worker left)."""


def exit_reason(returncode: int) -> str:
    """``SIGKILL`` for a child killed by a signal, ``exit_3`` for one that exited with 3."""
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal_{-returncode}"
    return f"exit_{returncode}"


class Child:
    """One supervised process: its spec, its current process, and its failure history."""

    def __init__(self, spec: ProcessSpec) -> None:
        self.spec = spec
        self.proc: subprocess.Popen[bytes] | None = None
        self.state = ChildState.STARTING
        self.since = 0.0  # when it entered its state (monotonic)
        self.starts = 0  # processes started
        self.failures: collections.deque[float] = collections.deque()  # within the window
        self.restart_at = 0.0
        self.last_reason = ""

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0


class Supervisor:
    """Runs ``specs`` as child processes under ``policy``; ``probe`` says whether a child's
    server is SERVING (called while it starts); ``decode_elsewhere``: the gateway also routes
    to decode workers this supervisor does not run."""

    def __init__(
        self,
        specs: list[ProcessSpec],
        env: dict[str, str],
        *,
        probe: Callable[[ProcessSpec], bool],
        policy: RestartPolicy | None = None,
        fail_fast: bool = False,
        start_timeout_s: float = 300.0,
        stop_grace_s: float = 10.0,
        metrics: SupervisorMetrics | None = None,
        state_file: Path | None = None,
        decode_elsewhere: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.children = {spec.name: Child(spec) for spec in specs}
        self.env = env
        self.probe = probe
        self.policy = policy or RestartPolicy()
        self.fail_fast = fail_fast
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self.metrics = metrics or SupervisorMetrics()
        self.state_file = state_file
        self.decode_elsewhere = decode_elsewhere
        self.clock = clock

    def start(self) -> None:
        """Start every child (raises :class:`ClusterFailed` as :meth:`tick` does)."""
        now = self.clock()
        for child in self.children.values():
            self._launch(child, now)
        self._changed()

    def tick(self) -> None:
        """Advance every child: notice exits, readiness and start timeouts, restart the ones
        whose delay is over. Raises :class:`ClusterFailed` when the cluster cannot go on."""
        now = self.clock()
        changed = False
        for child in self.children.values():
            before = (child.state, child.pid)
            self._advance(child, now)
            changed |= (child.state, child.pid) != before
        decode = [c for c in self.children.values() if c.spec.role == "decode"]
        lost = decode and all(c.state is ChildState.GAVE_UP for c in decode)
        if lost and not self.decode_elsewhere:
            raise ClusterFailed("every decode worker gave up; nothing can serve")
        if changed:
            self._changed()

    @property
    def ready(self) -> bool:
        """The gateway serves and every worker serves or was given up on."""
        settled = (ChildState.SERVING, ChildState.GAVE_UP)
        return all(
            c.state is ChildState.SERVING if c.spec.name == GATEWAY else c.state in settled
            for c in self.children.values()
        )

    def gave_up(self) -> list[str]:
        return [n for n, c in self.children.items() if c.state is ChildState.GAVE_UP]

    def _advance(self, child: Child, now: float) -> None:
        if child.state is ChildState.BACKOFF:
            if now >= child.restart_at:
                self._launch(child, now)
            return
        if child.state is ChildState.GAVE_UP or child.proc is None:
            return
        code = child.proc.poll()
        if code is not None:
            self._exited(child, code, now)
        elif child.state is ChildState.STARTING:
            if self.probe(child.spec):
                self._move(child, ChildState.SERVING, now)
                log.info(
                    "child_serving",
                    worker=child.spec.name,
                    pid=child.pid,
                    start=child.starts,
                    after_s=round(now - child.since, 3),
                )
            elif child.spec.name != GATEWAY and now - child.since > self.start_timeout_s:
                # the gateway serves only once a decode worker does: the decode workers' own
                # timeouts (and "every decode worker gave up") bound its start
                child.proc.kill()
                child.proc.wait()
                log.error(
                    "worker_start_timeout",
                    worker=child.spec.name,
                    pid=child.pid,
                    timeout_s=self.start_timeout_s,
                )
                self.metrics.exited(child.spec.name, "start_timeout")
                self._failed(child, "start_timeout", now)

    def _launch(self, child: Child, now: float) -> None:
        spec = child.spec
        for bind in spec.binds:
            error = bind_error(bind.host, bind.port)
            if error is not None:
                log.error(
                    "worker_port_unavailable",
                    worker=spec.name,
                    host=bind.host,
                    port=bind.port,
                    error=str(error),
                )
                print(
                    f"pdserve up: {spec.name} cannot listen on {bind.host}:{bind.port}: {error}",
                    file=sys.stderr,
                )
                self.metrics.port_unavailable(spec.name, bind.port)
                self._failed(child, "port_unavailable", now)
                return
        restart = child.starts > 0
        child.proc = subprocess.Popen(spec.argv, env=self.env)
        child.starts += 1
        if spec.cpus:
            os.sched_setaffinity(child.proc.pid, spec.cpus)
        self._move(child, ChildState.STARTING, now)
        if restart:
            self.metrics.restarted(spec.name)
        log.info(
            "worker_restarted" if restart else "process_started",
            worker=spec.name,
            pid=child.pid,
            address=spec.address,
            start=child.starts,
        )

    def _exited(self, child: Child, code: int, now: float) -> None:
        reason = exit_reason(code)
        self.metrics.exited(child.spec.name, reason)
        log.error(
            "worker_exited" if child.spec.name != GATEWAY else "gateway_exited",
            worker=child.spec.name,
            pid=child.pid,
            exit_code=code,
            reason=reason,
            phase=child.state.value,
            uptime_s=round(now - child.since, 3),
        )
        self._failed(child, reason, now)

    def _failed(self, child: Child, reason: str, now: float) -> None:
        """A start that failed or a process that ended: restart later, give up, or stop all."""
        name = child.spec.name
        child.last_reason = reason
        if name == GATEWAY:
            raise ClusterFailed(f"the gateway failed ({reason}); stopping")
        if self.fail_fast:
            raise ClusterFailed(f"{name} failed ({reason}); stopping (--fail-fast)")
        while child.failures and child.failures[0] <= now - self.policy.window_s:
            child.failures.popleft()
        delay = self.policy.delay(len(child.failures))
        if delay is None:
            self._move(child, ChildState.GAVE_UP, now)
            self.metrics.gave_up(name)
            log.error(
                "worker_gave_up",
                worker=name,
                reason=reason,
                restarts=len(child.failures),
                window_s=self.policy.window_s,
                address=child.spec.address,
            )
            print(
                f"pdserve up: giving up on {name} ({reason}, {len(child.failures)} restarts "
                f"within {self.policy.window_s:g}s); the rest keep serving",
                file=sys.stderr,
            )
            return
        child.failures.append(now)
        child.restart_at = now + delay
        self._move(child, ChildState.BACKOFF, now)
        log.warning(
            "worker_restart_scheduled",
            worker=name,
            reason=reason,
            attempt=len(child.failures),
            delay_s=delay,
        )

    def _move(self, child: Child, state: ChildState, now: float) -> None:
        child.state, child.since = state, now
        self.metrics.set_up(child.spec.name, state is ChildState.SERVING)

    def _changed(self) -> None:
        if self.state_file is not None:
            self.write_state(self.state_file)

    def write_state(self, path: Path) -> None:
        """The children as JSON (written atomically): name, pid (0: not running), address,
        command line, state, restarts."""
        children = [
            {
                "name": c.spec.name,
                "pid": c.pid,
                "address": c.spec.address,
                "argv": list(c.spec.argv),
                "state": c.state.value,
                "restarts": max(0, c.starts - 1),
            }
            for c in self.children.values()
        ]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "children": children}, indent=1))
        tmp.replace(path)

    def stop(self) -> None:
        """SIGTERM every live child, wait ``stop_grace_s``, then SIGKILL the rest."""
        live = [c for c in self.children.values() if c.proc is not None and c.proc.poll() is None]
        for child in live:
            assert child.proc is not None
            child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        for child in live:
            assert child.proc is not None
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("process_killed", worker=child.spec.name, pid=child.pid)
                child.proc.kill()
                child.proc.wait()
