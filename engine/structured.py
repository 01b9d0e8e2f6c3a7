"""Structured output on a worker: a grammar matcher that follows each constrained sequence's
output, and each step's allowed-token bitmask, computed beside the forward pass.

Three pieces. :class:`GrammarManager` (one per engine) builds the llguidance tokenizer on first
need, in the background, and owns the executor that computes masks with the GIL released.
:class:`GrammarState` (one per constrained :class:`~engine.sequence.Sequence`, its ``grammar``)
holds a matcher and how many output tokens it has consumed. It syncs lazily: before a mask and
after each appended token it consumes ``token_ids[output_start + consumed:]``, so every way a
sequence gets tokens is covered alike: a token sampled here, a first token that arrives with
imported KV, the generated tokens a failover resume brings in its prompt, a recompute after
preemption (which changes no tokens). :class:`PendingMask` is one step's bitmask in the making:
the runner starts it before the forward pass (every token it depends on is known by then) and
waits for it before sampling.

A grammar that does not compile here, or a token the matcher rejects, leaves the state FAILED
with a message; the sequence then finishes with ``FinishReason.ERROR`` (see
:meth:`Sequence.append_token`). A failed state masks nothing: the step's token is discarded.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import structlog
import torch
from llguidance import LLExecutor, LLMatcher, LLTokenizer

from core.structured_output import StructuredOutput

if TYPE_CHECKING:
    from engine.sequence import Sequence as EngineSequence

log = structlog.get_logger(__name__)

ERROR_PREFIX = "structured output failed"


class GrammarStatus(enum.Enum):
    """Where one sequence's matcher is."""

    PENDING = "pending"  # not compiled yet: the first sync compiles it
    MATCHING = "matching"  # the output so far is a prefix of the grammar
    COMPLETE = "complete"  # the grammar is done: nothing but EOS may follow
    FAILED = "failed"  # it did not compile, or rejected a token (see ``error``)


class TokenMask(NamedTuple):
    """Allowed tokens of some rows of a batch's logits."""

    rows: list[int]  # (R,) rows of the logits the mask constrains
    allowed: torch.Tensor  # (R, 32 * W) bool: llguidance's (R, W) int32 bitmask, unpacked


class GrammarState:
    """One sequence's matcher and how many of its output tokens it has consumed. Only the
    engine thread (or the mask helper it waits for) touches it."""

    def __init__(self, manager: GrammarManager, constraint: StructuredOutput) -> None:
        self.manager = manager
        self.constraint = constraint
        self.status = GrammarStatus.PENDING
        self.error: str | None = None
        self.consumed = 0  # output tokens the matcher has taken
        self.matcher: LLMatcher | None = None

    def sync(self, token_ids: Sequence[int], output_start: int) -> GrammarStatus:
        """Compile on first call, then consume the output tokens not consumed yet."""
        if self.status is GrammarStatus.FAILED:
            return self.status
        if self.matcher is None:
            self.matcher = self._compile()
            if self.matcher is None:
                return self.status
        matcher = self.matcher
        for token in token_ids[output_start + self.consumed :]:
            if not matcher.consume_token(token):
                return self._fail(
                    f"token {token} (output token {self.consumed}) does not fit the "
                    f"{self.constraint.describe()}: {_first_line(matcher.get_error())}"
                )
            self.consumed += 1
        self.status = GrammarStatus.COMPLETE if matcher.is_stopped() else GrammarStatus.MATCHING
        return self.status

    def _compile(self) -> LLMatcher | None:
        try:
            grammar = self.constraint.grammar()
        except Exception as exc:  # InvalidRequestError for a malformed spec
            self._fail(f"the {self.constraint.describe()} does not compile: {exc}")
            return None
        try:
            tokenizer = self.manager.tokenizer()
        except Exception as exc:
            log.exception("grammar_tokenizer_failed")
            self._fail(f"this worker cannot load its tokenizer for grammars: {exc}")
            return None
        try:
            matcher = LLMatcher(tokenizer, grammar, log_level=0)
        except Exception as exc:  # documented never to raise; a request must not kill a step
            self._fail(f"the {self.constraint.describe()} does not compile: {exc}")
            return None
        if matcher.is_error():
            detail = _first_line(matcher.get_error())
            self._fail(f"the {self.constraint.describe()} does not compile: {detail}")
            return None
        return matcher

    def _fail(self, why: str) -> GrammarStatus:
        self.status = GrammarStatus.FAILED
        self.error = f"{ERROR_PREFIX}: {why}"
        return self.status


class PendingMask:
    """One step's bitmask, computed on the manager's helper thread; :meth:`wait` joins it."""

    def __init__(self, future: Future[TokenMask | None]) -> None:
        self._future = future

    def wait(self) -> TokenMask | None:
        """The mask (None: every constrained row failed); re-raises the helper's exception."""
        return self._future.result()


class GrammarManager:
    """Builds the llguidance tokenizer once (``build_tokenizer``, off the engine thread when
    :meth:`prefetch` ran first) and computes batches of masks. Thread-safe."""

    def __init__(self, build_tokenizer: Callable[[], LLTokenizer]) -> None:
        self._build = build_tokenizer
        self._lock = threading.Lock()
        # the mask helper: one thread, started on the first submit
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self._tokenizer: Future[LLTokenizer] | None = None
        self._executor: LLExecutor | None = None

    @classmethod
    def for_model(
        cls, model_dir: Path, vocab_size: int, eos_token_ids: frozenset[int]
    ) -> GrammarManager:
        """From the tokenizer files in ``model_dir``; ``vocab_size``: the logits' width
        (tokens past the tokenizer's own are never allowed); ``eos_token_ids``: what ends a
        complete grammar."""
        return cls(lambda: load_tokenizer(model_dir, vocab_size, eos_token_ids))

    def attach(self, seq: EngineSequence) -> None:
        """Give a constrained sequence its state, unless it has one (compiled on first sync)."""
        if seq.sampling.structured is not None and seq.grammar is None:
            seq.grammar = self.new_state(seq.sampling.structured)

    def new_state(self, constraint: StructuredOutput) -> GrammarState:
        """A state for a sequence; starts building the tokenizer if nobody has yet."""
        self.prefetch()
        return GrammarState(self, constraint)

    def prefetch(self) -> None:
        """Start building the tokenizer on a thread of its own (once; a mask waiting for it on
        the helper thread cannot block the build)."""
        with self._lock:
            if self._tokenizer is not None:
                return
            future: Future[LLTokenizer] = Future()
            self._tokenizer = future

        def build() -> None:
            try:
                future.set_result(self._build())
            except BaseException as exc:  # the first constrained request reports it
                future.set_exception(exc)

        threading.Thread(target=build, name="grammar-tokenizer", daemon=True).start()

    def tokenizer(self) -> LLTokenizer:
        """The tokenizer, built (or waited for) on first use."""
        self.prefetch()
        assert self._tokenizer is not None
        return self._tokenizer.result()

    def start_masks(
        self, states: Sequence[GrammarState | None], tokens: Sequence[tuple[Sequence[int], int]]
    ) -> PendingMask | None:
        """Start computing the allowed tokens of each row with a state; ``tokens[row]`` is that
        row's ``(token_ids, output_start)``. None, at no cost, when no row has a state."""
        if all(state is None for state in states):
            return None
        return PendingMask(self._pool.submit(self.compute_masks, states, tokens))

    def compute_masks(
        self, states: Sequence[GrammarState | None], tokens: Sequence[tuple[Sequence[int], int]]
    ) -> TokenMask | None:
        """Sync each state, then fill one bitmask row per live matcher (GIL released)."""
        rows: list[int] = []
        matchers: list[tuple[LLMatcher, int]] = []
        for row, state in enumerate(states):
            if state is None or state.sync(*tokens[row]) is GrammarStatus.FAILED:
                continue
            assert state.matcher is not None
            matchers.append((state.matcher, len(rows)))
            rows.append(row)
        if not rows:
            return None
        words = (self.tokenizer().vocab_size + 31) // 32
        bitmask = np.empty((len(rows), words), dtype="<i4")  # (R, W): bit k of word w: 32w + k
        self._llg_executor().unsafe_compute_mask_ptr(
            matchers, bitmask.ctypes.data, words * 4, len(rows)
        )
        # unpacked here, off the critical path (numpy: ~30 us for 8 x 49k; torch's shifts: ms)
        allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
        return TokenMask(rows, torch.from_numpy(allowed.view(np.bool_)))  # (R, 32 * W)

    def _llg_executor(self) -> LLExecutor:
        if self._executor is None:
            self._executor = LLExecutor()
        return self._executor


def load_tokenizer(model_dir: Path, vocab_size: int, eos_token_ids: frozenset[int]) -> LLTokenizer:
    """The llguidance tokenizer of the model in ``model_dir`` (~0.3 s plus transformers' load
    for a 49k vocabulary), ``vocab_size`` wide at least, ending grammars with the model's EOS."""
    from llguidance.hf import from_tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    eos = sorted(eos_token_ids) or None
    width = max(vocab_size, len(hf))  # (a slow tokenizer raises ValueError)
    tokenizer = from_tokenizer(hf, n_vocab=width, eos_token=eos)  # type: ignore[arg-type]
    log.info("grammar_tokenizer_built", vocab_size=tokenizer.vocab_size, eos=eos)
    return tokenizer


def apply_token_mask(logits: torch.Tensor, mask: TokenMask) -> torch.Tensor:
    """``logits`` (S, V) with the tokens ``mask`` disallows set to -inf on its rows (columns
    past the mask's width too). Never writes into ``logits``."""
    num_rows, vocab = logits.shape
    allowed = mask.allowed.to(logits.device, non_blocking=True)  # (R, 32 * W)
    if allowed.shape[1] < vocab:  # logits wider than the tokenizer: the rest is disallowed
        extra = allowed.new_zeros((len(mask.rows), vocab - allowed.shape[1]))
        allowed = torch.cat([allowed, extra], dim=1)
    allowed = allowed[:, :vocab]  # (R, V)
    if mask.rows == list(range(num_rows)):
        return torch.where(allowed, logits, float("-inf"))
    index = torch.tensor(mask.rows, dtype=torch.long, device=logits.device)
    sub = torch.where(allowed, logits.index_select(0, index), float("-inf"))
    return logits.index_copy(0, index, sub)


def _first_line(message: str) -> str:
    """llguidance's messages end in a state dump; the first line says what went wrong."""
    return message.strip().splitlines()[0] if message.strip() else "no detail"
