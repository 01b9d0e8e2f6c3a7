"""Decides what one engine step computes, and owns every sequence's blocks.

Two queues. ``running`` holds admitted sequences, whatever they still need: a prompt chunk, the
rest of a prompt, or one token per step. ``waiting`` holds sequences not yet admitted: new
prompts, preempted sequences (no blocks; they recompute), and sequences whose KV arrived from a
prefill worker (they keep their blocks). Policy per step, as vLLM v1 does it: every running
sequence takes what it needs within the token budget, preempting the newest running sequences
(recompute) when the pool cannot grow it; then waiting sequences are admitted in order while
budget, ``max_num_seqs`` and blocks allow. Long prompts are therefore chunked, and a sequence
never waits while holding blocks that nobody can take back (no deadlock).

Speculative decoding (:mod:`engine.speculative`): a decoding sequence may carry draft tokens
into its step (``ScheduledSeq.draft``); they cost token budget and blocks taken only from free
ones, and after the step only the kept tokens count as computed and the blocks past them return.

All methods run under the engine's lock, and only these methods edit the queues. Blocks return
to the pool on every exit: finish (the engine calls :meth:`release`, or :meth:`retire` for an
exported prompt), abort, failed transfer and preemption.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import NamedTuple

from core.errors import OutOfBlocksError
from core.prefix_hash import ROOT, prefix_hashes
from core.sampling import FinishReason
from engine.block_pool import BlockPool
from engine.config import SchedulerConfig, SpeculativeConfig
from engine.parking import ParkingLot
from engine.sampler import BAD_LOGITS_TOKEN
from engine.sequence import Sequence, SequenceStatus
from engine.speculative import Speculator


class ScheduledSeq(NamedTuple):
    seq: Sequence
    num_new_tokens: int  # tokens of this sequence computed in this step (its draft's included)
    sample: bool  # whether this step ends with a new token for the sequence
    draft: tuple[int, ...] = ()
    """Draft tokens verified after the sequence's last token (a decoding sequence only)."""
    draft_slots: int = 0
    """Draft tokens the step has room for (budget, blocks); :meth:`Speculator.fill` puts up
    to that many into ``draft`` before the forward pass."""


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
    def __init__(
        self,
        config: SchedulerConfig,
        pool: BlockPool,
        block_size: int,
        speculator: Speculator | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.block_size = block_size
        self.speculator = speculator or Speculator(SpeculativeConfig())
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.awaiting_kv: dict[str, Sequence] = {}
        self.parking = ParkingLot()  # a draining worker's stopped sequences
        self.num_preemptions = 0
        self.prefix_query_tokens = 0  # tokens of admitted sequences looked up in the cache
        self.prefix_hit_tokens = 0  # of which found (their KV was not recomputed)

    # -- intake -----------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a sequence whose prompt this worker computes."""
        self.speculator.attach(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def reserve(self, seq: Sequence) -> list[int]:
        """Allocate blocks for a prompt whose KV another worker computes; caller sends the ids.

        The longest cached prefix is shared rather than received again: its blocks lead the
        list and ``seq.num_cached_tokens`` says how many tokens they cover (the sender skips
        them). Raises :class:`OutOfBlocksError` when the pool cannot hold the prompt now.
        """
        hits, hashes = self._cached_prefix(seq)
        needed = self.blocks_for(seq.num_tokens) - len(hits)
        revived = sum(1 for block_id in hits if self.pool.ref_count(block_id) == 0)
        if not self.pool.can_allocate(needed + revived):
            raise OutOfBlocksError(f"need {needed + revived} KV blocks, {self.pool.num_free} free")
        if hits:
            self.pool.share(hits)
            seq.block_hashes = hashes[: len(hits)]
            seq.num_cached_tokens = len(hits) * self.block_size
            self.prefix_hit_tokens += seq.num_cached_tokens
        seq.block_table = [*hits, *self.pool.allocate(needed)]
        self.speculator.attach(seq)
        seq.status = SequenceStatus.WAITING_FOR_KV
        self.awaiting_kv[seq.request_id] = seq
        return list(seq.block_table)

    def kv_ready(self, request_id: str, first_token_id: int) -> Finished | None:
        """Every page of a reserved prompt has arrived: the sequence queues for admission,
        keeping its blocks (its prompt needs no compute; its first token's KV is next)."""
        seq = self.awaiting_kv.pop(request_id)
        seq.num_computed_tokens = seq.num_tokens
        self._register_full_blocks(seq)
        seq.first_scheduled_time = seq.first_token_time = time.monotonic()
        reason = seq.append_token(first_token_id)
        if reason is not None:
            self._release(seq, reason)
            return Finished(seq, reason)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        return None

    def abort(self, request_id: str, reason: FinishReason) -> Sequence | None:
        """Drop a sequence wherever it is; returns it, or None when it is unknown or done."""
        seq = self.awaiting_kv.pop(request_id, None) or self.parking.take(request_id)
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
        speculate = self.speculator.speculates(self.running)
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._grow(seq, num_new, first_unscheduled=index):
                continue  # ``seq`` itself was preempted; the same index is the next sequence
            slots = self._draft_slots(seq, budget - num_new) if speculate and num_new == 1 else 0
            items.append(self._item(seq, num_new)._replace(draft_slots=slots))
            budget -= num_new + slots
            index += 1
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hits, hashes = self._cached_prefix(seq)
            start = seq.num_computed_tokens + len(hits) * self.block_size
            num_new = min(seq.num_tokens - start, budget)
            # (a KV-ready sequence needs one token; a new or preempted one its whole prompt,
            # less what the prefix cache holds)
            needed = self.blocks_for(start + num_new) - len(seq.block_table) - len(hits)
            revived = sum(1 for block_id in hits if self.pool.ref_count(block_id) == 0)
            if not self.pool.can_allocate(needed + revived) and not self._reclaim_waiting(
                needed + revived
            ):
                break  # first come, first served: later prompts do not overtake this one
            if hits:
                self.pool.share(hits)  # first: allocate() must not evict them
                seq.block_table = list(hits)
                seq.block_hashes = hashes[: len(hits)]
                seq.num_computed_tokens = seq.num_cached_tokens = start
                self.prefix_hit_tokens += start
            seq.block_table.extend(self.pool.allocate(needed))
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            items.append(self._item(seq, num_new))
            budget -= num_new
        return ScheduledBatch(tuple(items)) if items else None

    def update(self, batch: ScheduledBatch, sampled: Seq[int | Seq[int]]) -> list[Finished]:
        """Record the step's results: for each item its token, or the tokens its verified
        draft yielded (:func:`engine.speculative.accepted_tokens`), appended in order until one
        ends the sequence. Finished sequences leave ``running``; the caller reads what it needs
        of them, then gives their blocks back with :meth:`release`."""
        finished: list[Finished] = []
        for item, result in zip(batch.items, sampled, strict=True):
            tokens = (result,) if isinstance(result, int) else tuple(result)
            seq = item.seq
            if seq.is_finished:
                continue  # aborted while its step ran
            if item.draft:  # its last token's KV and the kept draft tokens' are valid
                seq.num_computed_tokens += len(tokens)
                if seq.spec is not None:
                    self.speculator.record(seq.spec, len(item.draft), len(tokens) - 1)
            else:
                seq.num_computed_tokens += item.num_new_tokens
            if BAD_LOGITS_TOKEN in tokens:  # NaN/inf KV: keep it out of the prefix cache
                self.pool.forget(seq.block_table)
            else:
                self._register_full_blocks(seq)
            if not item.sample:
                continue
            if seq.first_token_time is None:
                seq.first_token_time = time.monotonic()
            reason = None
            for token in tokens:
                reason = seq.append_token(token)
                if reason is not None:
                    break
            if reason is not None:
                self.running.remove(seq)
                finished.append(Finished(seq, reason))
            elif item.draft_slots:
                self._drop_blocks_past(seq.num_tokens, seq)
            if seq.spec is not None:  # the draft model's KV past the kept tokens is not valid
                seq.spec.draft_computed = min(seq.spec.draft_computed, seq.num_computed_tokens)
        return finished

    def release(self, seq: Sequence, reason: FinishReason) -> None:
        """Give a finished sequence's blocks back (after its KV was read, e.g. exported)."""
        self._release(seq, reason)

    def retire(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence's work here early, finished or not (an exporting prompt ends with its
        first token): it leaves ``running`` and its blocks go back."""
        if seq in self.running:
            self.running.remove(seq)
        self._release(seq, reason)

    def park_decoding(self) -> list[Sequence]:
        """Stop the running sequences that decode and keep them, blocks and all, in
        :attr:`parking` (a draining worker's, to be migrated; see :mod:`engine.parking`)."""
        parked = self.parking.park(self.running)
        for seq in parked:
            self.running.remove(seq)
        return parked

    def unpark(self, request_id: str) -> bool:
        """Put a parked sequence back in the batch for good (it is not parked again)."""
        seq = self.parking.release(request_id)
        if seq is not None:
            self.running.append(seq)
        return seq is not None

    def is_awaiting_kv(self, request_id: str) -> bool:
        """Whether blocks are reserved for this sequence and its pages are still in flight."""
        return request_id in self.awaiting_kv

    # -- helpers ----------------------------------------------------------------------------

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def check_fits(self, seq: Sequence, export_kv: bool) -> None:
        """Refuse a sequence that could never fit the pool, even alone (it would wait forever)."""
        remaining = 0 if export_kv else seq.sampling.max_tokens - seq.num_completion_tokens
        needed = self.blocks_for(seq.num_tokens + remaining)
        if needed > self.pool.num_blocks:
            raise OutOfBlocksError(
                f"request needs {needed} KV blocks of {self.block_size} tokens; "
                f"this worker's pool has {self.pool.num_blocks}"
            )

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def _cached_prefix(self, seq: Sequence) -> tuple[list[int], list[bytes]]:
        """Blocks of the prefix cache holding this sequence's longest cached prefix (full blocks,
        leaving at least one token to compute so the step can sample), with their hashes."""
        if not self.config.enable_prefix_caching or seq.block_table or seq.num_computed_tokens:
            return [], []
        self.prefix_query_tokens += seq.num_tokens
        limit = (seq.num_tokens - 1) // self.block_size
        hashes = prefix_hashes(seq.token_ids[: limit * self.block_size], self.block_size)
        hits: list[int] = []
        for block_hash in hashes:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits, hashes

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Offer the sequence's newly completed blocks to the prefix cache."""
        if not self.config.enable_prefix_caching:
            return
        done = len(seq.block_hashes)
        full = seq.num_computed_tokens // self.block_size
        if full <= done:
            return
        parent = seq.block_hashes[-1] if seq.block_hashes else ROOT
        tokens = seq.token_ids[: full * self.block_size]
        for index, block_hash in enumerate(
            prefix_hashes(tokens, self.block_size, done, parent), start=done
        ):
            self.pool.register(seq.block_table[index], block_hash)
            seq.block_hashes.append(block_hash)

    def _item(self, seq: Sequence, num_new: int) -> ScheduledSeq:
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = time.monotonic()
        completes = seq.num_computed_tokens + num_new == seq.num_tokens
        return ScheduledSeq(seq, num_new, completes)

    # -- speculative decoding ---------------------------------------------------------------

    def _draft_slots(self, seq: Sequence, budget: int) -> int:
        """Room for draft tokens in a decoding sequence's step, its next token's blocks being in
        place: at most ``budget``, none past its ``max_tokens``, and only as many as free
        blocks hold (a draft never preempts); their blocks are allocated here."""
        remaining = seq.sampling.max_tokens - seq.num_completion_tokens - 1
        slots = self.speculator.slots(seq.spec, min(budget, remaining))
        while slots:
            needed = self.blocks_for(seq.num_tokens + slots) - len(seq.block_table)
            if self.pool.can_allocate(needed):
                seq.block_table.extend(self.pool.allocate(needed))
                break
            slots -= 1
        return slots

    def _drop_blocks_past(self, num_tokens: int, seq: Sequence) -> None:
        """Return the blocks past the first ``num_tokens`` tokens' (a rejected draft's tail)."""
        keep = self.blocks_for(num_tokens)
        if len(seq.block_table) > keep:
            self.pool.free(seq.block_table[keep:])
            del seq.block_table[keep:]

    def _grow(self, seq: Sequence, num_new: int, first_unscheduled: int) -> bool:
        """Give a running sequence blocks for ``num_new`` more tokens, preempting the newest
        running sequences not yet scheduled this step (``seq`` itself last). Returns False
        when ``seq`` was preempted."""
        needed = self.blocks_for(seq.num_computed_tokens + num_new) - len(seq.block_table)
        while not self.pool.can_allocate(needed):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
            assert self.running.index(seq) >= first_unscheduled  # never a scheduled sequence
        seq.block_table.extend(self.pool.allocate(needed))
        return True

    def _reclaim_waiting(self, needed: int) -> bool:
        """With nothing running, free blocks held by queued KV-ready sequences (newest first;
        they will recompute) until the head of ``waiting`` can be admitted."""
        if self.running:
            return False  # running sequences finish and free their blocks; wait for them
        for seq in reversed(list(self.waiting)[1:]):
            if self.pool.can_allocate(needed):
                break
            if seq.block_table:
                self._drop_kv(seq)
                self.num_preemptions += 1
        return self.pool.can_allocate(needed)

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it recomputes its tokens' KV when readmitted.
        Recompute rather than swap: on CPU a swap is a copy into the same memory, and the
        recomputed KV is bit-identical, so greedy output does not change."""
        self.running.remove(seq)
        self._drop_kv(seq)  # its full blocks stay cached: recompute will hit them
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _drop_kv(self, seq: Sequence) -> None:
        """Free a sequence's blocks; it recomputes its KV (the draft model's too) when next
        admitted."""
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        if seq.spec is not None:
            seq.spec.draft_computed = 0

    def _release(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.block_table:
            self.pool.free(seq.block_table)
            seq.block_table = []
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
