"""Structured output without a model: grammar states over a byte-level tokenizer built in code,
the batch mask on greedy and sampled rows, lazy sync over resumed tokens, completion and
failure as finish reasons, and nothing at all for unconstrained batches."""

from __future__ import annotations

import json

import pytest
import torch
from llguidance import LLTokenizer
from llguidance.hf import from_tokenizer
from transformers import PreTrainedTokenizerFast

from core.sampling import FinishReason, SamplingParams
from core.structured_output import GrammarKind, StructuredOutput
from engine.sampler import Sampler, SampleRequest, process_logits
from engine.sequence import Sequence, output_for
from engine.structured import ERROR_PREFIX, GrammarManager, GrammarStatus, TokenMask
from tests.support.tokenizers import build_byte_level_tokenizer

VOCAB = 512
WIDTH = 520  # logits wider than the tokenizer: columns 512.. are no token at all
EOS = 0
SCHEMA = StructuredOutput(
    GrammarKind.JSON_SCHEMA,
    json.dumps(
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}},
            "required": ["a"],
            "additionalProperties": False,
        }
    ),
)
DIGITS = StructuredOutput(GrammarKind.REGEX, "[0-9]{80}")  # longer than any test runs
CHOICE = StructuredOutput(GrammarKind.CHOICE, choices=("yes", "no"))


@pytest.fixture(scope="module")
def hf() -> PreTrainedTokenizerFast:
    return build_byte_level_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def llg(hf: PreTrainedTokenizerFast) -> LLTokenizer:
    return from_tokenizer(hf, n_vocab=WIDTH, eos_token=[EOS])


@pytest.fixture
def manager(llg: LLTokenizer) -> GrammarManager:
    return GrammarManager(lambda: llg)


def _seq(
    manager: GrammarManager,
    constraint: StructuredOutput | None,
    prompt: list[int],
    resumed: int = 0,
    **params: object,
) -> Sequence:
    fields: dict[str, object] = {"max_tokens": 64, "temperature": 0.0, **params}
    sampling = SamplingParams(structured=constraint, **fields)  # type: ignore[arg-type]
    seq = Sequence(
        "r", list(prompt), len(prompt), sampling, frozenset({EOS}), resumed_tokens=resumed
    )
    manager.attach(seq)
    return seq


def _allowed(mask: TokenMask, k: int) -> set[int]:
    return set(mask.allowed[k].nonzero().flatten().tolist())


def _masks(manager: GrammarManager, seqs: list[Sequence]) -> TokenMask | None:
    pending = manager.start_masks(
        [s.grammar for s in seqs], [(s.token_ids, s.output_start) for s in seqs]
    )
    return None if pending is None else pending.wait()


def _text(hf: PreTrainedTokenizerFast, seq: Sequence) -> str:
    return hf.decode(seq.token_ids[seq.output_start :])


def test_mask_constrains_greedy_and_sampled_rows_and_the_extra_columns(manager, hf) -> None:
    greedy = _seq(manager, DIGITS, [5, 6])
    sampled = _seq(manager, DIGITS, [5, 6], temperature=1.0, seed=3)
    free = _seq(manager, None, [5, 6])
    seqs = [greedy, sampled, free]
    sampler = Sampler(seed=0)
    logits = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(0))
    logits[:, 515] = 1e4  # the likeliest column is no token: only the free row may take it
    for _ in range(6):
        mask = _masks(manager, seqs)
        assert mask is not None and mask.rows == [0, 1]
        assert all(t < VOCAB for k in range(2) for t in _allowed(mask, k))
        requests = [
            SampleRequest(s.sampling, s.num_tokens, s.token_ids, s.output_start) for s in seqs
        ]
        tokens = sampler.sample(logits, requests, mask)
        assert tokens[2] == 515
        for seq, token in zip(seqs[:2], tokens[:2], strict=True):
            assert token in _allowed(mask, seqs.index(seq))
            assert seq.append_token(token) is None
        logits = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(sum(tokens)))
        logits[:, 515] = 1e4
    for seq in seqs[:2]:
        assert _text(hf, seq).isdigit(), _text(hf, seq)


def test_unconstrained_batches_pay_nothing(manager) -> None:
    seqs = [_seq(manager, None, [5, 6]) for _ in range(3)]
    assert all(s.grammar is None for s in seqs)
    assert manager.start_masks([None, None], [([1], 1), ([2], 1)]) is None
    logits = torch.randn(3, WIDTH)
    requests = [SampleRequest(s.sampling, s.num_tokens) for s in seqs]
    assert process_logits(logits, requests, None) is logits


def test_grammar_completion_stops_without_an_eos_step(manager, hf) -> None:
    seq = _seq(manager, SCHEMA, [7, 8, 9])
    reasons = [seq.append_token(t) for t in hf.encode('{"a": 12}')]
    assert reasons[-1] is FinishReason.STOP and all(r is None for r in reasons[:-1])
    assert seq.grammar is not None and seq.grammar.status is GrammarStatus.COMPLETE
    assert EOS not in seq.token_ids


def test_choice_and_eos_when_the_grammar_may_go_on(manager, hf) -> None:
    seq = _seq(manager, StructuredOutput(GrammarKind.REGEX, "[0-9]+"), [7])
    for token in hf.encode("42"):
        assert seq.append_token(token) is None
    mask = _masks(manager, [seq])
    assert mask is not None and EOS in _allowed(mask, 0)  # accepting: EOS may end it
    assert seq.append_token(EOS) is FinishReason.STOP


def test_resumed_tokens_continue_the_grammar(manager, hf) -> None:
    """A failover resume: the prompt ends with output generated elsewhere; the matcher
    consumes it before the first mask here, so the continuation is a digit or the close."""
    prompt = [7, 8, 9]
    resumed = hf.encode('{"a": 1')
    seq = _seq(manager, SCHEMA, prompt + resumed, resumed=len(resumed))
    mask = _masks(manager, [seq])
    assert mask is not None and seq.grammar is not None
    assert seq.grammar.consumed == len(resumed)
    allowed = {hf.decode([t]) for t in _allowed(mask, 0)}
    assert "}" in allowed and "x" not in allowed and '"' not in allowed
    assert all(text[0].isdigit() or text[0] == "}" for text in allowed)


def test_rejected_resumed_token_fails_the_request_with_a_message(manager, hf) -> None:
    resumed = hf.encode("xy")
    seq = _seq(manager, SCHEMA, [7, *resumed], resumed=len(resumed))
    assert _masks(manager, [seq]) is None  # a failed row is not masked
    assert seq.append_token(5) is FinishReason.ERROR
    out = output_for(seq, (), FinishReason.ERROR)
    assert out.invalid_request and out.error is not None
    assert out.error.startswith(ERROR_PREFIX) and "json_schema" in out.error
    assert "\n" not in out.error  # llguidance's state dump is left out


def test_rejected_sampled_token_fails_the_request(manager, hf) -> None:
    seq = _seq(manager, CHOICE, [7])
    assert seq.append_token(hf.encode("x")[0]) is FinishReason.ERROR
    assert seq.error is not None and "does not fit the choice" in seq.error


def test_grammar_that_does_not_compile_here_fails_the_request(manager) -> None:
    seq = _seq(manager, StructuredOutput(GrammarKind.LARK, "start: foo("), [7])
    assert _masks(manager, [seq]) is None
    assert seq.grammar is not None and seq.grammar.status is GrammarStatus.FAILED
    assert seq.append_token(5) is FinishReason.ERROR
    assert seq.error is not None and "does not compile" in seq.error


def test_mixed_rows_mask_only_the_constrained_ones(manager) -> None:
    seqs = [_seq(manager, None, [5]), _seq(manager, CHOICE, [5]), _seq(manager, None, [5])]
    mask = _masks(manager, seqs)
    assert mask is not None and mask.rows == [1]
    logits = torch.zeros(3, WIDTH)
    out = process_logits(logits, [SampleRequest(s.sampling, s.num_tokens) for s in seqs], mask)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    allowed = torch.isfinite(out[1]).nonzero().flatten().tolist()
    assert set(allowed) == _allowed(mask, 0) and 0 < len(allowed) < 10
    assert torch.count_nonzero(logits) == 0  # never written into


def test_logit_bias_applies_after_the_mask(manager) -> None:
    """A bias cannot revive a disallowed token (the mask comes first)."""
    seq = _seq(manager, CHOICE, [5], logit_bias=((300, 100.0),))
    mask = _masks(manager, [seq])
    assert mask is not None and 300 not in _allowed(mask, 0)
    token = Sampler().sample(torch.zeros(1, WIDTH), [SampleRequest(seq.sampling, 1)], mask)[0]
    assert token in _allowed(mask, 0)


def test_tokenizer_is_built_once_and_a_failed_build_fails_requests_clearly(llg) -> None:
    builds: list[int] = []

    def build() -> LLTokenizer:
        builds.append(1)
        return llg

    manager = GrammarManager(build)
    seqs = [_seq(manager, CHOICE, [5]) for _ in range(3)]
    assert _masks(manager, seqs) is not None and len(builds) == 1

    def broken() -> LLTokenizer:
        raise OSError("no tokenizer.json")

    seq = _seq(GrammarManager(broken), CHOICE, [5])
    assert seq.append_token(5) is FinishReason.ERROR
    assert seq.error is not None and "cannot load its tokenizer" in seq.error
    assert "no tokenizer.json" in seq.error
