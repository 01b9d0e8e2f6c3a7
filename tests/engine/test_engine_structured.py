"""Structured output through the engine on a tiny random model (its tokenizer is built in
code): constrained rows obey their grammar, greedy or sampled, beside an unconstrained row that
stays token-identical to transformers; an exported prompt's first token obeys, and the decode
side continues the grammar from the imported token or from a failover's resumed tokens; a
grammar completes with STOP and fails with ERROR; a prefix hit is reported per request."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from core.sampling import FinishReason, SamplingParams
from core.structured_output import GrammarKind, StructuredOutput
from engine.engine import Engine, RequestOutput
from engine.sequence import Sequence
from engine.structured import ERROR_PREFIX
from tests.engine.tiny_engine import engine_config, greedy_reference, tiny_model

PROMPT = list(range(10, 31))  # 21 tokens: 5 full blocks of 4
FREE_TOKENS = 8
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}
JSON = StructuredOutput(GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA))
NUMBER = StructuredOutput(GrammarKind.REGEX, "[0-9]{1,6}")
CHOICE = StructuredOutput(GrammarKind.CHOICE, choices=("red", "green", "blue"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    model, spec = tiny_model(tmp_path_factory.mktemp("llama"))
    tokenizer = AutoTokenizer.from_pretrained(spec.path)
    return model, spec, tokenizer, greedy_reference(model, PROMPT, FREE_TOKENS)


def _engine(tiny) -> Engine:
    model, spec, _, _ = tiny
    return Engine(engine_config(spec), model, spec, sink=lambda outputs: None)


def _seq(
    tiny,
    rid: str,
    constraint: StructuredOutput | None,
    *,
    prompt: list[int] = PROMPT,
    resumed: int = 0,
    max_tokens: int = 40,
    temperature: float = 1.0,
) -> Sequence:
    sampling = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, seed=7, structured=constraint
    )
    spec = tiny[1]
    return Sequence(
        rid, list(prompt), len(prompt), sampling, spec.eos_token_ids, resumed_tokens=resumed
    )


def _run(engine: Engine) -> list[RequestOutput]:
    outputs: list[RequestOutput] = []
    for _ in range(500):
        if not engine.scheduler.has_work():
            return outputs
        outputs.extend(engine.step())
    raise AssertionError("engine did not finish")


def _tokens(outputs: list[RequestOutput], rid: str) -> list[int]:
    return [t for o in outputs if o.request_id == rid for t in o.token_ids]


def _reason(outputs: list[RequestOutput], rid: str) -> FinishReason | None:
    return next(o.finish_reason for o in outputs if o.request_id == rid and o.finish_reason)


def _check_json(tokenizer: PreTrainedTokenizerBase, tokens: list[int]) -> dict[str, object]:
    value = json.loads(tokenizer.decode(tokens))
    jsonschema.validate(value, SCHEMA)
    return value  # type: ignore[no-any-return]


def test_constrained_rows_obey_and_the_free_row_is_unchanged(tiny) -> None:
    _, _, tokenizer, expected = tiny
    engine = _engine(tiny)
    engine.add(_seq(tiny, "json", JSON))
    engine.add(_seq(tiny, "json-greedy", JSON, temperature=0.0))
    engine.add(_seq(tiny, "number", NUMBER))
    engine.add(_seq(tiny, "choice", CHOICE))
    engine.add(_seq(tiny, "free", None, max_tokens=FREE_TOKENS, temperature=0.0))
    outputs = _run(engine)
    assert _tokens(outputs, "free") == expected
    for rid in ("json", "json-greedy"):
        _check_json(tokenizer, _tokens(outputs, rid))
        assert _reason(outputs, rid) is FinishReason.STOP  # the closing brace ends it
    assert re.fullmatch("[0-9]{1,6}", tokenizer.decode(_tokens(outputs, "number")))
    assert tokenizer.decode(_tokens(outputs, "choice")) in CHOICE.choices
    assert _reason(outputs, "choice") is FinishReason.STOP
    assert not any(t in tiny[1].eos_token_ids for o in outputs for t in o.token_ids)
    assert engine.pool.num_free == engine.pool.num_blocks


def test_exported_first_token_obeys_and_the_decode_side_continues_it(tiny) -> None:
    _, _, tokenizer, _ = tiny
    prefill, decode = _engine(tiny), _engine(tiny)
    prefill.add(_seq(tiny, "r", JSON), export_kv=True)
    (out,) = _run(prefill)
    assert out.pages is not None and out.finish_reason is None
    first = out.token_ids[0]
    assert tokenizer.decode([first]).startswith("{")
    seq = _seq(tiny, "r", JSON)
    block_ids = list(decode.reserve_import(seq).block_ids)
    decode.kv_cache.scatter_pages(block_ids, out.pages)
    decode.kv_ready(seq.request_id, first)  # the grammar consumes the imported token first
    outputs = _run(decode)
    _check_json(tokenizer, [first, *_tokens(outputs, "r")])
    assert seq.grammar is not None and seq.grammar.consumed == seq.num_completion_tokens


def test_a_resumed_request_continues_the_grammar(tiny) -> None:
    _, _, tokenizer, _ = tiny
    resumed = tokenizer.encode('{"ok": true, "n": 1')
    engine = _engine(tiny)
    engine.add(_seq(tiny, "r", JSON, prompt=PROMPT + resumed, resumed=len(resumed)))
    outputs = _run(engine)
    value = _check_json(tokenizer, resumed + _tokens(outputs, "r"))
    assert value["ok"] is True and str(value["n"]).startswith("1")


def test_a_resumed_token_the_grammar_rejects_fails_the_request(tiny) -> None:
    _, _, tokenizer, _ = tiny
    resumed = tokenizer.encode("nope")
    engine = _engine(tiny)
    engine.add(_seq(tiny, "r", JSON, prompt=PROMPT + resumed, resumed=len(resumed)))
    (out,) = _run(engine)
    assert out.finish_reason is FinishReason.ERROR and out.invalid_request
    assert out.token_ids == () and out.error is not None
    assert out.error.startswith(ERROR_PREFIX) and "does not fit the json_schema" in out.error
    assert engine.pool.num_free == engine.pool.num_blocks


def test_a_grammar_that_fails_on_the_worker_is_an_invalid_request(tiny) -> None:
    engine = _engine(tiny)
    engine.add(_seq(tiny, "bad", StructuredOutput(GrammarKind.REGEX, "(unclosed")))
    engine.add(_seq(tiny, "free", None, max_tokens=FREE_TOKENS, temperature=0.0))
    outputs = _run(engine)
    (bad,) = [o for o in outputs if o.request_id == "bad"]
    assert bad.finish_reason is FinishReason.ERROR and bad.invalid_request
    assert bad.error is not None and "does not compile" in bad.error
    assert _tokens(outputs, "free") == tiny[3]  # the batch around it is unharmed


def test_prefix_cache_hits_are_reported_per_request(tiny) -> None:
    engine = _engine(tiny)
    engine.add(_seq(tiny, "miss", None, max_tokens=2, temperature=0.0))
    first = _run(engine)
    engine.add(_seq(tiny, "hit", None, max_tokens=2, temperature=0.0))
    second = _run(engine)
    assert all(o.num_cached_tokens == 0 for o in first)
    assert second[0].num_cached_tokens == 20  # 5 full blocks of 4; the last token computes
