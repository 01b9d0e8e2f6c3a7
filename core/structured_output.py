"""Structured output: what a request constrains its output to, as plain data, and the grammar
it compiles to.

The grammar engine is llguidance (torch-free, no ahead-of-time compile): the gateway validates a
constraint with it before any worker is involved, and every worker that samples part of the
request (the prefill worker the first token, the decode worker the rest, a resume elsewhere)
builds a matcher from the same :meth:`StructuredOutput.grammar` text and advances it over the
request's output so far. JSON is produced without free whitespace (``", "`` and ``": "``
separators, as ``json.dumps``), so a sampled run cannot wander off into blank lines.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.errors import InvalidRequestError

if TYPE_CHECKING:
    from llguidance import LLTokenizer
    from llguidance._lib import JsonCompileOptions

MAX_SPEC_CHARS = 64 * 1024  # a schema, regex or grammar longer than this is refused
MAX_CHOICES = 256
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


class GrammarKind(enum.Enum):
    """What :attr:`StructuredOutput.spec` holds. Values are the field names of the proto's
    ``StructuredOutput.kind`` oneof."""

    JSON_SCHEMA = "json_schema"  # a JSON Schema, as JSON text
    JSON_OBJECT = "json_object"  # any JSON object (spec unused)
    REGEX = "regex"  # the whole output matches it
    CHOICE = "choice"  # the output is exactly one of ``choices``
    LARK = "grammar"  # a Lark grammar in llguidance's dialect


@dataclass(frozen=True)
class StructuredOutput:
    """One constraint on a request's output (see :class:`GrammarKind`)."""

    kind: GrammarKind
    spec: str = ""
    choices: tuple[str, ...] = ()

    def grammar(self) -> str:
        """The llguidance grammar (its JSON form) this constraint compiles to; raises
        InvalidRequestError when ``spec`` is not even well-formed (bad JSON, no choices, nested
        past the compiler's recursion limit)."""
        try:
            return self._grammar()
        except (ValueError, RecursionError) as exc:  # llguidance's, or json's on deep nesting
            raise InvalidRequestError(f"invalid {self.kind.value}: {exc}") from None

    def _grammar(self) -> str:
        from llguidance import LLMatcher

        kind = self.kind
        if kind is GrammarKind.JSON_OBJECT:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if kind is GrammarKind.JSON_SCHEMA:
            try:
                schema = json.loads(self.spec)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"json_schema is not valid JSON: {exc}") from None
            if not isinstance(schema, dict | bool):
                raise InvalidRequestError(
                    f"json_schema must be a JSON object, got {type(schema).__name__}"
                )
            return LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        if kind is GrammarKind.REGEX:
            return LLMatcher.grammar_from_regex(self.spec)
        if kind is GrammarKind.CHOICE:
            if not self.choices:
                raise InvalidRequestError("choice needs at least one string")
            # Lark string literals take JSON's escapes
            alternatives = " | ".join(json.dumps(c) for c in self.choices)
            return LLMatcher.grammar_from_lark(f"start: {alternatives}")
        return LLMatcher.grammar_from_lark(self.spec)

    def describe(self) -> str:
        """A short label for logs and metrics."""
        return self.kind.value


def validate_structured_output(
    constraint: StructuredOutput, tokenizer: LLTokenizer | None = None
) -> None:
    """Raise InvalidRequestError, with the grammar engine's message, unless ``constraint``
    compiles (against ``tokenizer``'s vocabulary when given)."""
    from llguidance import LLMatcher

    if len(constraint.spec) > MAX_SPEC_CHARS:
        raise InvalidRequestError(
            f"the {constraint.kind.value} is {len(constraint.spec)} characters; at most "
            f"{MAX_SPEC_CHARS} are allowed"
        )
    if len(constraint.choices) > MAX_CHOICES:
        raise InvalidRequestError(
            f"choice has {len(constraint.choices)} strings; at most {MAX_CHOICES} are allowed"
        )
    if constraint.kind is GrammarKind.CHOICE and any(not c for c in constraint.choices):
        raise InvalidRequestError("choice strings must not be empty")
    if constraint.kind in (GrammarKind.REGEX, GrammarKind.LARK) and not constraint.spec:
        raise InvalidRequestError(f"the {constraint.kind.value} is empty")
    error = LLMatcher.validate_grammar(constraint.grammar(), tokenizer)
    if error:
        raise InvalidRequestError(f"invalid {constraint.kind.value}: {error.strip()}")
