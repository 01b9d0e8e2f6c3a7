"""Decides what one engine step computes, and owns every sequence's blocks.

Policy, as one expression per step: running sequences first (one token each), newest preempted
(recompute) when the pool cannot grow them; then waiting sequences in arrival order, each taking
as many prompt tokens as the step's token budget leaves (long prompts are chunked).

All methods run under the engine's lock. A sequence's blocks return to the pool on every exit:
finish, abort, failed transfer and preemption all go through :meth:`Scheduler._release`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from engine.block_pool import BlockPool
from engine.config import SchedulerConfig
from engine.sequence import FinishReason, Sequence, SequenceStatus


class ScheduledSeq(NamedTuple):
    seq: Sequence
    num_new_tokens: int  # tokens of this sequence computed in this step
    sample: bool  # whether this step ends with a new token for the sequence


@dataclass(frozen=True)
class ScheduledBatch:
    """Plain data handed to the model runner: who computes how many tokens this step."""

    items: tuple[ScheduledSeq, ...]

    @property
    def num_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.items)


class Finished(NamedTuple):
    seq: Sequence
    reason: FinishReason


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool, block_size: int) -> None:
        self.config = config
        self.pool = pool
        self.block_size = block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.awaiting_kv: dict[str, Sequence] = {}
        self.num_preemptions = 0

    # -- intake -----------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a sequence whose prompt this worker computes."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def reserve(self, seq: Sequence) -> list[int]:
        """Allocate blocks for a prompt whose KV another worker computes; caller sends the ids.

        Raises :class:`OutOfBlocksError` when the pool cannot hold the prompt now.
        """
        seq.block_table = self.pool.allocate(self.blocks_for(seq.num_tokens))
        seq.status = SequenceStatus.WAITING_FOR_KV
        self.awaiting_kv[seq.request_id] = seq
        return list(seq.block_table)

    def kv_ready(self, request_id: str, first_token_id: int) -> Finished | None:
        """Every page of a reserved prompt has arrived: the sequence joins the batch."""
        seq = self.awaiting_kv.pop(request_id)
        seq.num_computed_tokens = seq.num_tokens
        reason = seq.append_token(first_token_id)
        if reason is not None:
            self._release(seq, reason)
            return Finished(seq, reason)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return None

    def abort(self, request_id: str, reason: FinishReason) -> Sequence | None:
        """Drop a sequence wherever it is; returns it, or None when it is unknown or done."""
        seq = self.awaiting_kv.pop(request_id, None)
        if seq is None:
            seq = next((s for s in self.running if s.request_id == request_id), None)
            if seq is not None:
                self.running.remove(seq)
        if seq is None:
            seq = next((s for s in self.waiting if s.request_id == request_id), None)
            if seq is not None:
                self.waiting.remove(seq)
        if seq is None:
            return None
        self._release(seq, reason)
        return seq

    # -- one step ---------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch | None:
        items: list[ScheduledSeq] = []
        budget = self.config.max_num_batched_tokens
        for seq in self._grow_running():
            items.append(ScheduledSeq(seq, 1, True))
            budget -= 1
        index = 0
        while index < len(self.waiting) and budget > 0 and len(items) < self.config.max_num_seqs:
            seq = self.waiting[index]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            needed = self.blocks_for(seq.num_computed_tokens + num_new) - len(seq.block_table)
            if not self.pool.can_allocate(needed):
                break  # first come, first served: later prompts do not overtake this one
            seq.block_table.extend(self.pool.allocate(needed))
            completes = seq.num_computed_tokens + num_new == seq.num_tokens
            items.append(ScheduledSeq(seq, num_new, completes))
            budget -= num_new
            index += 1
        return ScheduledBatch(tuple(items)) if items else None

    def update(self, batch: ScheduledBatch, sampled: list[int]) -> list[Finished]:
        """Record the step's results; finished sequences give their blocks back at once."""
        finished: list[Finished] = []
        for item, token in zip(batch.items, sampled, strict=True):
            seq = item.seq
            if seq.is_finished:
                continue  # aborted while its step ran
            seq.num_computed_tokens += item.num_new_tokens
            if not item.sample:
                continue
            reason = seq.append_token(token)
            if seq.status is SequenceStatus.WAITING:
                self.waiting.remove(seq)
                if reason is None:
                    seq.status = SequenceStatus.RUNNING
                    self.running.append(seq)
            elif reason is not None:
                self.running.remove(seq)
            if reason is not None:
                finished.append(Finished(seq, reason))
        return finished

    def release(self, seq: Sequence, reason: FinishReason) -> None:
        """Give a finished sequence's blocks back (after its KV was read, e.g. exported)."""
        self._release(seq, reason)

    # -- helpers ----------------------------------------------------------------------------

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def _grow_running(self) -> list[Sequence]:
        """Give each running sequence a slot for its next token, preempting the newest if needed."""
        ready: list[Sequence] = []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            if len(seq.block_table) * self.block_size > seq.num_computed_tokens:
                ready.append(seq)
                continue
            while not self.pool.can_allocate(1) and queue:
                self._preempt(queue.pop())  # newest first
            if self.pool.can_allocate(1):
                seq.block_table.extend(self.pool.allocate(1))
                ready.append(seq)
            else:
                self._preempt(seq)
        return ready

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it recomputes its tokens' KV when readmitted."""
        self.running.remove(seq)
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.block_table:
            self.pool.free(seq.block_table)
            seq.block_table = []
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
