"""IncrementalDetokenizer: streamed text equals the full decode, never ends mid-character."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from transformers import PreTrainedTokenizerFast

from gateway.detokenizer import MAX_HELD_TOKENS, MAX_PROMPT_CONTEXT_TOKENS, IncrementalDetokenizer
from tests.support.tokenizers import CORPUS, build_byte_level_tokenizer, build_metaspace_tokenizer

TEXT = " ".join(CORPUS)
REPLACEMENT_CHAR = "\ufffd"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_byte_level_tokenizer(512)


@pytest.fixture(scope="module")
def metaspace() -> PreTrainedTokenizerFast:
    return build_metaspace_tokenizer()


def stream(
    tokenizer: PreTrainedTokenizerFast,
    prompt: Sequence[int],
    generated: Sequence[int],
    rng: random.Random,
) -> list[str]:
    """Feed ``generated`` in random-sized chunks; return every chunk of text, flush last."""
    detok = IncrementalDetokenizer(tokenizer, prompt)
    chunks = []
    i = 0
    while i < len(generated):
        n = rng.choice([1, 1, 1, 2, 3, 5])
        chunks.append(detok.add(generated[i : i + n]))
        i += n
    chunks.append(detok.flush())
    return chunks


def random_split(
    tokenizer: PreTrainedTokenizerFast, rng: random.Random
) -> tuple[list[int], list[int]]:
    """A random slice of the corpus, tokenized and cut between characters into (prompt, generated).

    Tokens may still split characters inside ``generated``: that is what the tests are after.
    """
    while True:
        start = rng.randrange(len(TEXT))
        ids = tokenizer(TEXT[start : start + rng.randrange(2, 200)])["input_ids"]
        if len(ids) >= 2:
            cut = rng.randrange(1, len(ids))
            if not tokenizer.decode(ids[:cut]).endswith(REPLACEMENT_CHAR):
                return ids[:cut], ids[cut:]


@pytest.mark.parametrize("seed", range(5))
def test_valid_streams_equal_full_decode(tokenizer: PreTrainedTokenizerFast, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(100):
        prompt, generated = random_split(tokenizer, rng)
        chunks = stream(tokenizer, prompt, generated, rng)
        assert "".join(chunks) == tokenizer.decode(generated, skip_special_tokens=True)
        assert not any(REPLACEMENT_CHAR in chunk for chunk in chunks)


@pytest.mark.parametrize("seed", range(5))
def test_random_token_ids_equal_full_decode(tokenizer: PreTrainedTokenizerFast, seed: int) -> None:
    """Arbitrary ids, special tokens and invalid byte sequences included."""
    rng = random.Random(seed)
    for _ in range(100):
        prompt = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 10))]
        generated = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 80))]
        chunks = stream(tokenizer, prompt, generated, rng)
        assert "".join(chunks) == tokenizer.decode(generated, skip_special_tokens=True)


def test_character_split_across_tokens_is_held_until_complete(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    ids = tokenizer("語")["input_ids"]
    assert len(ids) == 3  # one byte per token: the test needs a split character
    detok = IncrementalDetokenizer(tokenizer, tokenizer("Hello")["input_ids"])
    assert detok.add(ids[:1]) == ""
    assert detok.add(ids[1:2]) == ""
    assert detok.add(ids[2:]) == "語"
    assert detok.flush() == ""


def test_emoji_after_space_streams_token_by_token(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer("ok 🙂 done")["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [])
    chunks = [detok.add([token_id]) for token_id in ids] + [detok.flush()]
    assert "".join(chunks) == "ok 🙂 done"
    assert "🙂" in chunks  # emitted whole, in one chunk


def test_flush_emits_an_incomplete_character(tokenizer: PreTrainedTokenizerFast) -> None:
    first_byte = tokenizer("語")["input_ids"][:1]
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.add(first_byte) == ""
    assert detok.flush() == tokenizer.decode(first_byte) == REPLACEMENT_CHAR


def test_special_tokens_are_skipped(tokenizer: PreTrainedTokenizerFast) -> None:
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = tokenizer("語")["input_ids"]
    # A special token between the bytes of one character does not break it.
    generated = [im_start, ids[0], im_end, *ids[1:], tokenizer.eos_token_id]
    detok = IncrementalDetokenizer(tokenizer, [])
    text = "".join(detok.add([token_id]) for token_id in generated) + detok.flush()
    assert text == "語"


def test_empty_add_returns_nothing(tokenizer: PreTrainedTokenizerFast) -> None:
    detok = IncrementalDetokenizer(tokenizer, [1, 2, 3])
    assert detok.add([]) == ""
    assert detok.flush() == ""


def test_prompt_ending_mid_character_is_not_completed(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer("語")["input_ids"]
    prompt, generated = tokenizer("Hi")["input_ids"] + ids[:1], ids[1:]
    text = "".join(stream(tokenizer, prompt, generated, random.Random(0)))
    assert text == tokenizer.decode(generated)


class RecordingTokenizer:
    """Delegates ``decode`` and records how many ids each call decoded."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self._tokenizer = tokenizer
        self.lengths: list[int] = []

    def decode(self, token_ids: list[int], **kwargs: object) -> str:
        self.lengths.append(len(token_ids))
        return self._tokenizer.decode(token_ids, **kwargs)


@pytest.mark.parametrize("kind", ["text", "invalid_bytes"])
def test_decode_window_stays_bounded(tokenizer: PreTrainedTokenizerFast, kind: str) -> None:
    if kind == "text":
        generated = tokenizer(TEXT * 3)["input_ids"]
    else:  # lead bytes only: every prefix ends in U+FFFD, so the window never ends clean
        lead_byte = tokenizer("語")["input_ids"][0]
        generated = [lead_byte] * 500
    recorder = RecordingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(recorder, tokenizer("Hi there")["input_ids"])  # type: ignore[arg-type]
    chunk = 3
    text = "".join(detok.add(generated[i : i + chunk]) for i in range(0, len(generated), chunk))
    text += detok.flush()
    assert text == tokenizer.decode(generated)
    bound = 2 * (MAX_HELD_TOKENS + chunk) + MAX_PROMPT_CONTEXT_TOKENS
    assert max(recorder.lengths[:-1]) <= bound  # flush may decode once more; also bounded
    assert max(recorder.lengths) <= bound


def test_metaspace_keeps_the_leading_space_of_the_first_token(
    metaspace: PreTrainedTokenizerFast,
) -> None:
    prompt = metaspace("Hello")["input_ids"]
    generated = metaspace("Hello world")["input_ids"][len(prompt) :]
    assert metaspace.decode(generated) == "world"  # the decoder strips a leading space ...
    text = "".join(stream(metaspace, prompt, generated, random.Random(0)))
    assert text == " world"  # ... but the text after the prompt has it


@pytest.mark.parametrize("seed", range(3))
def test_metaspace_streams_equal_text_after_prompt(
    metaspace: PreTrainedTokenizerFast, seed: int
) -> None:
    """Byte-fallback tokens (<0xE6> ...) split CJK and emoji across tokens."""
    rng = random.Random(seed)
    for _ in range(100):
        prompt, generated = random_split(metaspace, rng)
        chunks = stream(metaspace, prompt, generated, rng)
        full, prompt_text = metaspace.decode(prompt + generated), metaspace.decode(prompt)
        assert "".join(chunks) == full[len(prompt_text) :]
        assert not any(REPLACEMENT_CHAR in chunk for chunk in chunks)
