"""Per-request state on one worker: :class:`Sequence` with its :class:`SequenceStatus`, and
:class:`RequestOutput`, what one engine step reports for it.

The scheduler moves a sequence between statuses and owns its ``block_table``; the engine reads
``export_kv`` to decide whether the sequence's work here ends with its first token (the prompt's
KV pages leave through the engine's export connector, see ``engine.kv_connector``). A sequence
with a structured-output constraint carries its matcher in ``grammar`` (``engine.structured``):
:meth:`Sequence.append_token` ends it when the grammar completes or rejects a token.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from core.sampling import FinishReason, RequestTimings, SamplingParams, TokenLogprob
from engine.sampler import SAMPLING_FAILURES
from engine.speculative import SpecState
from engine.structured import GrammarState, GrammarStatus

if TYPE_CHECKING:
    import torch


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life on one worker."""

    WAITING_FOR_KV = "waiting_for_kv"  # blocks reserved, pages in flight from a prefill worker
    WAITING = "waiting"  # queued for (more) prefill compute
    RUNNING = "running"  # in the batch: one token per step
    PARKED = "parked"  # stopped by a draining worker, blocks kept, until it migrates or ends
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
    export_kv: bool = False
    """Computed here for another worker: stops after its first token, its prompt's KV exported."""
    resumed_tokens: int = 0
    """Trailing prompt tokens this request generated before a failover resumed it here: output
    for the presence and frequency penalties (see :attr:`output_start`)."""
    grammar: GrammarState | None = None
    """The structured-output matcher over the output (set by the engine when constrained)."""
    spec: SpecState | None = None
    """Its speculative decoding (the scheduler's; None: it decodes one token per step)."""
    error: str | None = None
    """Why the request itself cannot go on (its grammar failed): another worker would fail it
    the same way, so it is the caller's INVALID_ARGUMENT, not a worker failure."""
    error_is_own: bool = True
    """Whether ``error`` is the request's fault (False: the server's, e.g. NaN model logits)."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_start(self) -> int:
        """Index in ``token_ids`` of the request's first generated token (a resume's included)."""
        return self.num_prompt_tokens - self.resumed_tokens

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_decoding(self) -> bool:
        """Only its last token's KV is missing: its next step computes one token (or a draft)."""
        return self.num_tokens - self.num_computed_tokens == 1

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
        """Append a sampled token and return why the sequence must stop now, if it must: ERROR
        when the grammar rejects it (``error`` says why), STOP on a stop token or EOS or when
        the grammar is complete, LENGTH at ``max_tokens``. A negative ``token_id`` is the
        sampler's failure for this row (see :data:`engine.sampler.SAMPLING_FAILURES`): ERROR,
        nothing appended."""
        if token_id < 0:
            self.error, self.error_is_own = SAMPLING_FAILURES[token_id]
            return FinishReason.ERROR
        self.token_ids.append(token_id)
        grammar = self.grammar
        synced = grammar.sync(self.token_ids, self.output_start) if grammar else None
        if grammar is not None and synced is GrammarStatus.FAILED:
            self.error = grammar.error
            return FinishReason.ERROR
        stop_ids = self.sampling.stop_token_ids
        if token_id in stop_ids or (
            not self.sampling.ignore_eos and token_id in self.eos_token_ids
        ):
            return FinishReason.STOP
        if synced is GrammarStatus.COMPLETE:
            return FinishReason.STOP
        if self.num_completion_tokens >= self.sampling.max_tokens:
            return FinishReason.LENGTH
        return None


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request. ``pages`` is set for KV-exporting sequences."""

    request_id: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_completion_tokens: int
    pages: torch.Tensor | None = None  # (L, 2, n, bs, KVH, D) copy of the prompt's blocks,
    # for exporting sequences in ExportMode.AFTER_PREFILL (the default)
    error: str | None = None
    timings: RequestTimings | None = None  # on the last output of a request
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token when the request asked for them
    num_cached_tokens: int = 0  # prompt tokens whose KV came from this worker's prefix cache
    parked: bool = False
    """The worker is draining and stopped the sequence here (no token with it): it waits,
    blocks kept, to be migrated (:meth:`engine.engine.Engine.parked_pages`) or ended."""
    invalid_request: bool = False
    """With ``error``: the request's own failure (its grammar, sampling parameters that leave
    nothing to sample), INVALID_ARGUMENT to the caller,
    never retried on another worker (which would fail it the same way)."""


def output_for(
    seq: Sequence,
    tokens: tuple[int, ...],
    reason: FinishReason | None,
    pages: torch.Tensor | None = None,
    error: str | None = None,
    last: bool = False,
    logprobs: tuple[TokenLogprob, ...] = (),
    parked: bool = False,
) -> RequestOutput:
    """``last``: the request's final output here even without a finish reason (export). An
    ERROR without ``error`` reports the sequence's own (:attr:`Sequence.error`)."""
    own = reason is FinishReason.ERROR and error is None and seq.error is not None
    return RequestOutput(
        request_id=seq.request_id,
        token_ids=tokens,
        finish_reason=reason,
        num_prompt_tokens=seq.num_prompt_tokens,
        num_completion_tokens=seq.num_completion_tokens,
        pages=pages,
        error=seq.error if own else error,
        timings=seq.timings(time.monotonic()) if last or reason is not None else None,
        logprobs=logprobs,
        num_cached_tokens=seq.num_cached_tokens,
        parked=parked,
        invalid_request=own and seq.error_is_own,
    )
