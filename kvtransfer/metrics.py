"""Counters every transfer endpoint keeps, per backend; exported by the observability layer.

Each instance is written by one thread (its endpoint's) and read by others; CPython makes the
individual increments atomic enough for monotonic counters.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class TransferStats:
    backend: str
    transfers_started: int = 0
    transfers_completed: int = 0
    pages: int = 0
    bytes: int = 0
    failures: Counter[str] = field(default_factory=Counter)  # by reason
    dropped_frames: Counter[str] = field(default_factory=Counter)  # by reason
    duration_counts: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS))
    """Transfers whose duration (first frame -> done) was <= each bucket bound (cumulative)."""
    duration_sum_s: float = 0.0

    def fail(self, reason: str) -> None:
        self.failures[reason] += 1

    def drop(self, reason: str) -> None:
        self.dropped_frames[reason] += 1

    def completed(self, seconds: float) -> None:
        self.transfers_completed += 1
        self.duration_sum_s += seconds
        for i, bound in enumerate(DURATION_BUCKETS):
            if seconds <= bound:
                self.duration_counts[i] += 1


def failure_label(message: str) -> str:
    """A bounded metric label for a failure message: its ``label:`` prefix, or "malformed"."""
    head, sep, _ = message.partition(":")
    label = head.strip().replace(" ", "_")
    return label if sep and label.isidentifier() and len(label) <= 24 else "malformed"
