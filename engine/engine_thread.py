"""The engine's thread: started under a name operators and tools see, and watched as it works.

:data:`ENGINE_THREAD_NAME` is both the Python thread's name and the native one (Linux
``prctl(PR_SET_NAME)``, 15 bytes at most), so ``top -H``, ``py-spy dump`` and
``/proc/<pid>/task/<tid>/comm`` show which thread is the engine. Threads the engine thread
creates (an OpenMP team, with ``--threads`` above 1) inherit the native name; the engine thread
itself is the one whose pid and tid the ``engine_thread_started`` log line gives.

:class:`StepMonitor` records the engine's progress: when the step under way began, when it last
moved (the step began, or a layer of its forward pass finished), and what it holds. A watchdog
judges the engine by the time it has been busy (a step under way, or work waiting for one)
without moving, not by the age of the step: a legitimate step can be long but keeps moving
(measured on two shared CPU cores, default model, a 2048-token chunk at 8k context: 68 s for
the step, at most 6.5 s between moves with one thread; 45 s and 2.9 s with two), while wherever
the engine thread hangs (in a kernel, on a lock, in its loop between steps) the moves stop. On a
GPU the forward pass is queued at once and the thread then waits at the sampler's copy to the
host: the gap is the GPU's step time, and a hung GPU holds it there for good.

Invariants: only the engine thread writes the monitor (:meth:`StepMonitor.step` around each
step, :meth:`StepMonitor.listening` inside the forward pass); any thread reads it with
:meth:`StepMonitor.snapshot`, which takes no lock (a handful of attribute reads, each atomic
under the GIL), so a reader never waits on anything a stuck engine thread holds. It is what
``server_runtime.engine_watchdog`` judges the engine by.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import structlog

from engine.scheduler import ScheduledBatch

log = structlog.get_logger(__name__)

ENGINE_THREAD_NAME = "pdserve-engine"
_PR_SET_NAME = 15  # <linux/prctl.h>
_MAX_NATIVE_NAME = 15  # bytes, without the terminating NUL
_HELD_IDS_SHOWN = 8  # request ids a snapshot names (the rest are counted)


def set_native_thread_name(name: str) -> bool:
    """Name the calling thread for the OS (Linux; truncated to 15 bytes). False elsewhere or
    when refused: the name is for operators, nothing depends on it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        raw = name.encode()[:_MAX_NATIVE_NAME]
        return int(libc.prctl(_PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


class StepSnapshot(NamedTuple):
    """The engine thread as a reader finds it."""

    steps: int
    """Steps begun so far (the one under way included)."""
    started_at: float | None
    """Monotonic time the step under way began; None between steps (idle, or waiting)."""
    moves: int
    """Signs of progress so far: steps begun plus layers finished."""
    moved_at: float | None
    """Monotonic time of the last of them while the engine is busy (a step under way, or work
    waiting for one); None while it is idle."""
    layer: int | None
    """The last layer the step under way finished (None: none yet)."""
    seqs: int
    """Sequences in the batch of the step under way (0: not known, e.g. scheduling)."""
    tokens: int
    """Tokens that batch computes."""
    request_ids: tuple[str, ...]
    """Engine keys of the first sequences of that batch."""
    thread_alive: bool
    """The engine thread runs (False before start, and after it ended)."""
    died: str | None
    """What ended the thread, if an exception did (None: alive, or stopped as asked)."""


class StepMonitor:
    """Marks of the engine thread's steps (see the module docstring for who writes and reads)."""

    def __init__(
        self,
        held: Callable[[], ScheduledBatch | None] = lambda: None,
        has_work: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``held`` gives the batch the step under way computes, ``has_work`` whether sequences
        wait for steps (both read without a lock)."""
        self._held = held
        self._has_work = has_work
        self._clock = clock
        self._steps = 0
        self._started_at: float | None = None
        self._moves = 0
        self._moved_at = 0.0
        self._layer: int | None = None
        self._thread: threading.Thread | None = None
        self._died: str | None = None

    @contextmanager
    def step(self) -> Iterator[None]:
        """Around one step of the loop (engine thread only)."""
        self._steps += 1
        self._layer = None
        self._moved()
        self._started_at = self._moved_at
        try:
            yield
        finally:
            self._started_at = None

    def listening(self, inner: Callable[[int], None] | None) -> Callable[[int], None]:
        """A layer listener for the model runner: marks each finished layer as progress, then
        calls ``inner`` (the step's own listener, if any)."""

        def on_layer(layer: int) -> None:
            self._layer = layer
            self._moved()
            if inner is not None:
                inner(layer)

        return on_layer

    def _moved(self) -> None:
        self._moved_at = self._clock()
        self._moves += 1

    def snapshot(self) -> StepSnapshot:
        """The engine thread now (any thread, no lock)."""
        started_at = self._started_at
        moves, moved_at, layer = self._moves, self._moved_at, self._layer
        busy = started_at is not None or self._has_work()
        batch = self._held() if started_at is not None else None
        items = batch.items if batch is not None else ()
        thread = self._thread
        return StepSnapshot(
            steps=self._steps,
            started_at=started_at,
            moves=moves,
            moved_at=moved_at if busy else None,
            layer=layer if started_at is not None else None,
            seqs=len(items),
            tokens=sum(item.num_new_tokens for item in items),
            request_ids=tuple(item.seq.request_id for item in items[:_HELD_IDS_SHOWN]),
            thread_alive=thread is not None and thread.is_alive(),
            died=self._died,
        )

    @property
    def thread(self) -> threading.Thread | None:
        """The engine thread, once started."""
        return self._thread

    def start_thread(self, loop: Callable[[], None]) -> threading.Thread:
        """Run ``loop`` on a daemon thread named :data:`ENGINE_THREAD_NAME` (in Python and for
        the OS); an exception that ends it is logged and recorded for :meth:`snapshot`."""

        def run() -> None:
            set_native_thread_name(ENGINE_THREAD_NAME)
            log.info("engine_thread_started", pid=os.getpid(), tid=threading.get_native_id())
            try:
                loop()
            except BaseException as exc:
                self._died = f"{type(exc).__name__}: {exc}"
                log.exception("engine_thread_died")

        self._thread = threading.Thread(target=run, name=ENGINE_THREAD_NAME, daemon=True)
        self._thread.start()
        return self._thread
