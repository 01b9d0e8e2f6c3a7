"""Speculative decoding: draft tokens for decoding sequences, how many, and what became of them.

A step verifies a sequence's draft in the same forward pass as the rest of the batch: its last
token and its k draft tokens are k + 1 decode rows, each attending its own context exactly as
one decode token at that position would (see :mod:`engine.model_runner`), and each row is
sampled as that position would be without speculation. The draft's longest prefix that agrees
with those samples is kept, plus the sample after it (:func:`accepted_tokens`). Greedy and
seeded rows therefore produce exactly the tokens decoding without speculation does (a seeded
row's generator depends on its position alone, see :mod:`engine.token_draw`). Unseeded rows
keep the target distribution: a draft token survives with the probability the target gives it,
and a rejected one is replaced by a draw from the target without it, which is rejection
sampling for a one-point proposal (what prompt lookup proposes).

KV (:mod:`engine.scheduler`): a draft grows the block table only from free blocks (it never
preempts); only kept tokens count as computed; blocks past them go back after the step. A
rejected token's slot is overwritten later and never seen as valid: prefix-cache hashes cover
blocks below ``num_computed_tokens`` only, and prefill workers (whose KV is exported) do not
speculate.

Adaptive (:class:`SpecState`): a sequence proposes up to its own ``k``, which grows after a
draft kept whole and shrinks to what was kept otherwise; after drafts that keep nothing it
stops proposing for a while (doubling each time), so ungrounded text pays almost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from core.pool_stats import SpecStats
from engine.config import SpeculativeConfig, SpeculativeMethod

if TYPE_CHECKING:
    from engine.scheduler import ScheduledBatch
    from engine.sequence import Sequence as EngineSequence

MAX_BACKOFF_STEPS = 64
"""The longest pause, in steps, of a sequence whose drafts keep being rejected."""


class NgramIndex:
    """Prompt lookup over one sequence's tokens: for its trailing n-gram (longest first, from
    ``max_n`` down to ``min_n``), the tokens that followed that n-gram's latest earlier
    occurrence. Indexed incrementally: each call indexes only the tokens new since the last,
    so a step costs a few dictionary operations per new token, not a scan."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        self._ends: dict[tuple[int, ...], int] = {}
        """n-gram -> end (exclusive) of its latest occurrence indexed so far."""
        self._indexed = 0  # n-grams ending at or before this were indexed

    def propose(self, tokens: Sequence[int], k: int) -> tuple[int, ...]:
        """Up to ``k`` tokens to follow ``tokens`` (empty: no earlier occurrence)."""
        n = len(tokens)
        # index the n-grams ending before the last token, so the trailing one never finds itself
        for end in range(max(self._indexed + 1, self.min_n), n):
            for size in range(self.min_n, min(self.max_n, end) + 1):
                self._ends[tuple(tokens[end - size : end])] = end
        self._indexed = max(self._indexed, n - 1)
        for size in range(min(self.max_n, n - 1), self.min_n - 1, -1):
            found = self._ends.get(tuple(tokens[n - size : n]))
            if found is not None:
                return tuple(tokens[found : found + k])
        return ()


@dataclass
class SpecState:
    """One sequence's speculation: its proposer's index and its adaptive draft length."""

    k: int
    """Draft tokens to propose next at most."""
    index: NgramIndex | None = None
    """Prompt lookup's index of the sequence's tokens (``ngram``)."""
    pause: int = 0
    """Steps left without proposing (after drafts that kept nothing)."""
    misses: int = 0
    """Drafts in a row that kept nothing."""
    draft_computed: int = 0
    """Positions whose draft-model KV is valid (``draft``; 0 again after a preemption)."""

    def record(self, proposed: int, kept: int, max_k: int) -> None:
        """Adapt after a verified draft of ``proposed`` tokens of which ``kept`` survived."""
        if kept == proposed:
            self.k = min(self.k + 1, max_k)
        else:
            self.k = max(1, kept + 1)
        if kept:
            self.misses = 0
            return
        self.misses += 1
        if self.misses >= 2:
            self.pause = min(2 ** (self.misses - 2), MAX_BACKOFF_STEPS)


class DraftRequest(NamedTuple):
    """A sequence that may take up to ``k`` draft tokens this step (blocks are in place)."""

    seq: EngineSequence
    k: int


class Proposer(Protocol):
    """Proposes draft tokens for the step's speculating sequences."""

    def new_state(self, k: int) -> SpecState:
        """The state of a sequence about to start speculating (its draft length ``k``)."""
        ...

    def propose(self, requests: Sequence[DraftRequest]) -> list[tuple[int, ...]]:
        """For each request up to ``k`` tokens likely to follow its sequence's tokens (empty:
        nothing worth verifying). Runs on the engine thread outside the engine's lock, before
        the step's forward pass; reads the sequences, never changes them."""
        ...


@dataclass(frozen=True)
class NgramProposer:
    """Prompt lookup through each sequence's :class:`NgramIndex`."""

    min_n: int
    max_n: int

    def new_state(self, k: int) -> SpecState:
        return SpecState(k, NgramIndex(self.min_n, self.max_n))

    def propose(self, requests: Sequence[DraftRequest]) -> list[tuple[int, ...]]:
        drafts = []
        for seq, k in requests:
            assert seq.spec is not None and seq.spec.index is not None
            drafts.append(seq.spec.index.propose(seq.token_ids, k))
        return drafts


@dataclass
class SpecCounters:
    """What speculation did on this worker since it started (its metrics)."""

    proposed: int = 0
    """Draft tokens verified."""
    accepted: int = 0
    """Of which kept."""
    verify_steps: int = 0
    """Sequence-steps that verified a draft (each emits accepted + 1 tokens of those)."""

    def snapshot(self) -> SpecStats:
        return SpecStats(self.proposed, self.accepted, self.verify_steps)


class Speculator:
    """Sizes drafts for the scheduler, fills them before the forward pass, and learns from
    their verification.

    ``proposer``: where drafts come from; by default the configured method's (none when
    ``off``; ``draft`` needs its model's, see :mod:`engine.draft_model`). Tests give their own
    (a draft that is always right, or always wrong)."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer | None = None) -> None:
        self.config = config
        if proposer is None and config.method is SpeculativeMethod.NGRAM:
            proposer = NgramProposer(config.ngram_min, config.ngram_max)
        if proposer is None and config.method is SpeculativeMethod.DRAFT:
            raise ValueError("--speculative draft needs its draft model's proposer")
        self.proposer = proposer
        self.counters = SpecCounters()

    @property
    def enabled(self) -> bool:
        return self.proposer is not None

    def attach(self, seq: EngineSequence) -> None:
        """Give a sequence that may speculate its state: not an exporting prompt (its work here
        ends with its first token), not a constrained one (its grammar advances one sampled
        token at a time)."""
        if seq.spec is None and not seq.export_kv and seq.sampling.structured is None:
            seq.spec = self.new_state()

    def speculates(self, running: Sequence[EngineSequence]) -> bool:
        """Whether a step over ``running`` proposes drafts: at most ``max_seqs`` decode."""
        if self.proposer is None:
            return False
        decoding = sum(1 for s in running if s.is_decoding)
        return decoding <= self.config.max_seqs

    def slots(self, state: SpecState | None, limit: int) -> int:
        """How many draft tokens to make room for in a sequence's step: up to
        ``min(limit, state.k)`` (scheduler, engine lock); none while it pauses."""
        if state is None or limit <= 0 or self.proposer is None:
            return 0
        if state.pause:
            state.pause -= 1
            return 0
        return min(limit, state.k)

    def fill(self, batch: ScheduledBatch) -> ScheduledBatch:
        """The batch with each item that has draft slots given its draft (engine thread,
        outside the lock: proposing may run a model). An item whose proposer found nothing
        stays a plain decode item; its unused slots' blocks go back after the step."""
        wanted = [i for i, item in enumerate(batch.items) if item.draft_slots]
        if not wanted or self.proposer is None:
            return batch
        requests = [DraftRequest(batch.items[i].seq, batch.items[i].draft_slots) for i in wanted]
        items = list(batch.items)
        for i, draft in zip(wanted, self.proposer.propose(requests), strict=True):
            draft = draft[: items[i].draft_slots]
            items[i] = items[i]._replace(num_new_tokens=1 + len(draft), draft=draft)
        return type(batch)(tuple(items))

    def new_state(self) -> SpecState | None:
        """A sequence's speculation state (None when this worker does not speculate)."""
        if self.proposer is None:
            return None
        return self.proposer.new_state(self.config.num_tokens)

    def record(self, state: SpecState, proposed: int, kept: int) -> None:
        self.counters.proposed += proposed
        self.counters.accepted += kept
        self.counters.verify_steps += 1
        state.record(proposed, kept, self.config.num_tokens)


def accepted_tokens(draft: Sequence[int], sampled: Sequence[int]) -> tuple[int, ...]:
    """The tokens a verified draft yields: ``sampled`` holds the sample of each of the draft's
    ``len(draft) + 1`` rows (row j: the token after the sequence and ``draft[:j]``); the draft's
    longest prefix equal to those samples is kept, then the next row's sample follows."""
    if len(sampled) != len(draft) + 1:
        raise ValueError(f"{len(draft)} draft tokens need {len(draft) + 1} samples")
    kept = 0
    while kept < len(draft) and sampled[kept] == draft[kept]:
        kept += 1
    return tuple(sampled[: kept + 1])
