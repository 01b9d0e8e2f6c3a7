"""core.structured_output: every kind compiles to a grammar that accepts what it should and
refuses what it should not, against a real (in-code) tokenizer; bad constraints are refused
with the compiler's message."""

from __future__ import annotations

import json

import llguidance.hf
import pytest
from llguidance import LLMatcher, LLTokenizer

from core.errors import InvalidRequestError
from core.structured_output import (
    MAX_CHOICES,
    MAX_SPEC_CHARS,
    GrammarKind,
    StructuredOutput,
    validate_structured_output,
)
from tests.support.tokenizers import build_byte_level_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> tuple[object, LLTokenizer]:
    hf = build_byte_level_tokenizer(512)
    return hf, llguidance.hf.from_tokenizer(hf)


def _accepts(
    tokenizer: tuple[object, LLTokenizer], constraint: StructuredOutput, text: str
) -> bool:
    hf, llg = tokenizer
    matcher = LLMatcher(llg, constraint.grammar(), log_level=0)
    ok = matcher.consume_tokens(hf.encode(text))  # type: ignore[attr-defined]
    return ok and matcher.is_accepting()


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
    "required": ["name", "n"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("constraint", "good", "bad"),
    [
        (
            StructuredOutput(GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA)),
            '{"name": "Ann", "n": 3}',
            '{"name": "Ann"}',
        ),
        (StructuredOutput(GrammarKind.JSON_OBJECT), '{"a": [1, 2]}', "[1, 2]"),
        (StructuredOutput(GrammarKind.REGEX, "[a-c]{2}[0-9]"), "ab7", "abc"),
        (StructuredOutput(GrammarKind.CHOICE, choices=("yes", 'say "no"')), 'say "no"', "no"),
        (StructuredOutput(GrammarKind.LARK, 'start: "x"+ "!"'), "xxx!", "xy!"),
    ],
)
def test_each_kind_accepts_and_refuses(
    tokenizer: tuple[object, LLTokenizer], constraint: StructuredOutput, good: str, bad: str
) -> None:
    validate_structured_output(constraint, tokenizer[1])
    assert _accepts(tokenizer, constraint, good)
    assert not _accepts(tokenizer, constraint, bad)


def test_json_has_no_free_whitespace(tokenizer: tuple[object, LLTokenizer]) -> None:
    """json.dumps' separators only: a sampled run cannot wander into blank lines."""
    constraint = StructuredOutput(GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA))
    assert _accepts(tokenizer, constraint, json.dumps({"name": "A", "n": 1}))
    assert not _accepts(tokenizer, constraint, '{\n  "name": "A", "n": 1}')


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        (StructuredOutput(GrammarKind.JSON_SCHEMA, "{not json"), "json_schema is not valid JSON"),
        (StructuredOutput(GrammarKind.JSON_SCHEMA, "[1]"), "must be a JSON object"),
        (StructuredOutput(GrammarKind.JSON_SCHEMA, '{"type": "frob"}'), "invalid json_schema"),
        (StructuredOutput(GrammarKind.REGEX, "a(b"), "invalid regex"),
        (StructuredOutput(GrammarKind.REGEX, ""), "the regex is empty"),
        (StructuredOutput(GrammarKind.LARK, "start: missing"), "invalid grammar"),
        (StructuredOutput(GrammarKind.CHOICE), "choice needs at least one string"),
        (StructuredOutput(GrammarKind.CHOICE, choices=("a", "")), "must not be empty"),
        (
            StructuredOutput(GrammarKind.CHOICE, choices=tuple(map(str, range(MAX_CHOICES + 1)))),
            f"at most {MAX_CHOICES}",
        ),
        (StructuredOutput(GrammarKind.REGEX, "a" * (MAX_SPEC_CHARS + 1)), "characters; at most"),
    ],
)
def test_bad_constraints_are_refused_with_a_message(
    tokenizer: tuple[object, LLTokenizer], constraint: StructuredOutput, message: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate_structured_output(constraint, tokenizer[1])
    assert message in str(info.value)


def test_valid_without_a_tokenizer() -> None:
    validate_structured_output(StructuredOutput(GrammarKind.REGEX, "[0-9]+"))
