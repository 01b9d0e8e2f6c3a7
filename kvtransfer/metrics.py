"""Counters every transfer endpoint keeps, per backend; exported by the observability layer.

Each instance is written by one thread (its endpoint's) and read by others; CPython makes the
individual increments atomic enough for monotonic counters.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class TransferStats:
    backend: str
    transfers_started: int = 0
    transfers_completed: int = 0
    pages: int = 0
    bytes: int = 0
    failures: Counter[str] = field(default_factory=Counter)  # by reason
    dropped_frames: Counter[str] = field(default_factory=Counter)  # by reason
    durations_s: list[float] = field(default_factory=list)  # first frame -> done, last 1024

    def fail(self, reason: str) -> None:
        self.failures[reason] += 1

    def drop(self, reason: str) -> None:
        self.dropped_frames[reason] += 1

    def completed(self, seconds: float) -> None:
        self.transfers_completed += 1
        self.durations_s.append(seconds)
        if len(self.durations_s) > 1024:
            del self.durations_s[:512]
