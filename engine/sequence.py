"""Per-request state on one worker: :class:`Sequence` with its :class:`SequenceStatus`."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from core.sampling import FinishReason, RequestTimings, SamplingParams


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life on one worker."""

    WAITING_FOR_KV = "waiting_for_kv"  # blocks reserved, pages in flight from a prefill worker
    WAITING = "waiting"  # queued for (more) prefill compute
    RUNNING = "running"  # in the batch: one token per step
    FINISHED = "finished"  # done; blocks already returned


@dataclass(eq=False)
class Sequence:
    """All state of one request on one worker.

    ``token_ids`` holds the prompt followed by every generated token. ``num_computed_tokens``
    counts the positions whose KV is in the cache; a sequence needs compute while it lags
    ``len(token_ids)`` (prefill is that lag being large, decode is that lag being one).
    ``block_table`` lists the sequence's KV blocks in order; the sequence owns them until it
    finishes, when the scheduler returns them to the pool.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    finish_reason: FinishReason | None = None
    arrival_time: float = 0.0  # time.monotonic() of each milestone on this worker
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    block_hashes: list[bytes] = field(default_factory=list)
    """Prefix hashes of the sequence's full blocks whose KV is computed (see prefix_cache)."""
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    def timings(self, now: float) -> RequestTimings:
        """Queue, prefill and decode time on this worker, as vLLM reports them."""
        scheduled = self.first_scheduled_time if self.first_scheduled_time is not None else now
        first = self.first_token_time if self.first_token_time is not None else now
        return RequestTimings(
            queue_s=scheduled - self.arrival_time,
            prefill_s=max(0.0, first - scheduled),
            decode_s=max(0.0, now - first),
        )

    def append_token(self, token_id: int) -> FinishReason | None:
        """Append a sampled token and return why the sequence must stop now, if it must."""
        self.token_ids.append(token_id)
        stop_ids = self.sampling.stop_token_ids
        if token_id in stop_ids or (
            not self.sampling.ignore_eos and token_id in self.eos_token_ids
        ):
            return FinishReason.STOP
        if self.num_completion_tokens >= self.sampling.max_tokens:
            return FinishReason.LENGTH
        return None
