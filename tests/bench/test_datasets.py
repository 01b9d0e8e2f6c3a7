"""Benchmark datasets: exact lengths, really shared prefixes, ShareGPT parsing, seeding."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from pdserve.bench.datasets import (
    LengthRange,
    random_requests,
    shared_prefix_requests,
    sharegpt_requests,
    usable_token_ids,
)
from tests.support.tokenizers import build_byte_level_tokenizer

VOCAB = 512


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_byte_level_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def vocab(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    return usable_token_ids(tokenizer, VOCAB)


def test_vocab_excludes_special_tokens_and_respects_the_model_size(
    tokenizer: PreTrainedTokenizerFast, vocab: list[int]
) -> None:
    assert not set(tokenizer.all_special_ids) & set(vocab)
    assert {0, 1, 2}.isdisjoint(vocab)  # eos, <|im_start|>, <|im_end|>
    assert max(vocab) < VOCAB
    assert max(usable_token_ids(tokenizer, 300)) < 300


def test_length_range_parse() -> None:
    assert LengthRange.parse("16,256") == LengthRange(16, 256)
    assert LengthRange.parse("16-256") == LengthRange(16, 256)
    assert LengthRange.parse("128") == LengthRange(128, 128)
    for bad in ("", "a,b", "1,2,3", "0,4", "9,3"):
        with pytest.raises(ValueError):
            LengthRange.parse(bad)


def test_random_requests_have_exact_lengths_and_are_seeded(vocab: list[int]) -> None:
    reqs = random_requests(vocab, 200, LengthRange(16, 256), LengthRange(16, 128), seed=0)
    assert len(reqs) == 200
    assert all(16 <= r.prompt_len <= 256 and 16 <= r.output_len <= 128 for r in reqs)
    assert min(r.prompt_len for r in reqs) < 64 and max(r.prompt_len for r in reqs) > 200
    assert all(set(r.prompt_token_ids) <= set(vocab) for r in reqs)
    fixed = random_requests(vocab, 5, LengthRange(7, 7), LengthRange(3, 3), seed=0)
    assert [(r.prompt_len, r.output_len) for r in fixed] == [(7, 3)] * 5
    again = random_requests(vocab, 200, LengthRange(16, 256), LengthRange(16, 128), seed=0)
    other = random_requests(vocab, 200, LengthRange(16, 256), LengthRange(16, 128), seed=1)
    assert reqs == again
    assert reqs != other


def test_shared_prefix_requests_really_share_their_prefixes(vocab: list[int]) -> None:
    reqs = shared_prefix_requests(
        vocab,
        12,
        num_prefixes=3,
        prefix_len=32,
        suffix_len=LengthRange(4, 8),
        output_len=LengthRange(5, 5),
        seed=0,
    )
    assert len(reqs) == 12
    prefixes = Counter(r.prompt_token_ids[:32] for r in reqs)
    assert len(prefixes) == 3 and set(prefixes.values()) == {4}  # 3 prefixes x 4 suffixes
    assert all(36 <= r.prompt_len <= 40 and r.output_len == 5 for r in reqs)
    assert len({r.prompt_token_ids for r in reqs}) == 12  # suffixes differ
    # shuffled: consecutive requests do not simply cycle through the prefixes in order
    order = [list(prefixes).index(r.prompt_token_ids[:32]) for r in reqs]
    assert order != [i % 3 for i in range(12)]


def _conversation(human: str, gpt: str) -> dict[str, object]:
    return {"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}


def test_sharegpt_parses_prompts_and_reference_output_lengths(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 3
    entries = [
        _conversation(long_prompt, "The capital of France is Paris, of course."),
        _conversation("Once upon a time there was a model.", "It generated one token at a time."),
        {"conversations": [{"from": "human", "value": "only one turn"}]},  # dropped: < 2 turns
        {"id": "no conversations at all"},  # dropped
        _conversation("hi", "This answer is long enough but the prompt is not."),  # < 4 tokens
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(entries))
    reqs = sharegpt_requests(path, tokenizer, num_requests=2, seed=0)
    expected = {
        (
            tuple(tokenizer.encode(e[0], add_special_tokens=False)),
            len(tokenizer.encode(e[1], add_special_tokens=False)),
        )
        for e in [
            (long_prompt, "The capital of France is Paris, of course."),
            ("Once upon a time there was a model.", "It generated one token at a time."),
        ]
    }
    assert {(r.prompt_token_ids, r.output_len) for r in reqs} == expected
    fixed = sharegpt_requests(path, tokenizer, num_requests=2, seed=0, output_len=9)
    assert [r.output_len for r in fixed] == [9, 9]
    with pytest.raises(ValueError, match="only 2 usable"):
        sharegpt_requests(path, tokenizer, num_requests=3, seed=0)
    # a context too small for the long prompt leaves only one usable conversation
    n_long = len(tokenizer.encode(long_prompt, add_special_tokens=False))
    with pytest.raises(ValueError, match="only 1 usable"):
        sharegpt_requests(path, tokenizer, num_requests=2, seed=0, max_model_len=n_long)
