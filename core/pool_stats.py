"""What a worker reports about its KV pool and queues (read by load reports and metrics)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpecStats:
    """Speculative decoding on one worker since it started."""

    proposed: int = 0
    """Draft tokens verified."""
    accepted: int = 0
    """Of which kept."""
    verify_steps: int = 0
    """Sequence-steps that verified a draft (each emitting its kept tokens plus one)."""


@dataclass(frozen=True)
class PoolStats:
    total_blocks: int
    free_blocks: int
    running: int
    waiting: int
    awaiting_kv: int
    pool_ok: bool
    num_preemptions: int
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    spec: SpecStats = SpecStats()

    @property
    def usage(self) -> float:
        return 1.0 - self.free_blocks / self.total_blocks
