"""What a worker reports about its KV pool and queues (read by load reports and metrics)."""

from __future__ import annotations

from dataclasses import dataclass


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

    @property
    def usage(self) -> float:
        return 1.0 - self.free_blocks / self.total_blocks
