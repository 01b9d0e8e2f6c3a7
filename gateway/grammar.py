"""Structured-output checks at the gateway: every constraint is compiled by the grammar engine
against the served tokenizer before a worker sees the request, so a bad schema, regex or
grammar is an INVALID_ARGUMENT (HTTP 400) with the compiler's message, never a failed stream.

The llguidance tokenizer is built on first use (about 0.3 s for a 49k vocabulary, ~1 s for
150k) and shared; constraints that compiled are remembered, so a schema sent with every request
is compiled once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import structlog
from transformers import PreTrainedTokenizerBase

from core.structured_output import StructuredOutput, validate_structured_output

if TYPE_CHECKING:
    from llguidance import LLTokenizer

log = structlog.get_logger(__name__)

VALIDATED_CACHE_SIZE = 256


class GrammarValidator:
    """Validates :class:`StructuredOutput` constraints for one tokenizer (thread-safe)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._hf = tokenizer
        self._tokenizer: LLTokenizer | None = None
        self._unavailable = False
        self._lock = threading.Lock()
        self._valid: OrderedDict[StructuredOutput, None] = OrderedDict()

    def check(self, constraint: StructuredOutput) -> None:
        """Raise InvalidRequestError unless ``constraint`` compiles."""
        with self._lock:
            if constraint in self._valid:
                self._valid.move_to_end(constraint)
                return
        validate_structured_output(constraint, self._llg_tokenizer())
        with self._lock:
            self._valid[constraint] = None
            while len(self._valid) > VALIDATED_CACHE_SIZE:
                self._valid.popitem(last=False)

    def _llg_tokenizer(self) -> LLTokenizer | None:
        """None when the tokenizer cannot be wrapped (slow tokenizers): the grammar is then
        checked on its own, and the vocabulary-specific part on the worker."""
        with self._lock:
            if self._tokenizer is None and not self._unavailable:
                from llguidance.hf import from_tokenizer

                try:
                    self._tokenizer = from_tokenizer(self._hf)  # type: ignore[arg-type]
                except ValueError as exc:
                    log.warning("grammar_tokenizer_unavailable", error=str(exc))
                    self._unavailable = True
                    return None
                log.info("grammar_tokenizer_built", vocab_size=self._tokenizer.vocab_size)
            return self._tokenizer
