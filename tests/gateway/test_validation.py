"""validate_sampling: every invalid field is rejected with a message naming it and its value."""

from __future__ import annotations

import math

import pytest

from core.errors import InvalidRequestError
from core.sampling import SamplingParams
from gateway.validation import (
    DEFAULT_MAX_TOKENS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    validate_sampling,
)

MAX_MODEL_LEN = 2048
VOCAB = 1000


def test_defaults_are_valid() -> None:
    assert DEFAULT_MAX_TOKENS == 16
    validate_sampling(SamplingParams(), prompt_len=10, max_model_len=MAX_MODEL_LEN)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=2.5, top_p=1.0, top_k=0),
        SamplingParams(top_p=1e-6, top_k=1),
        SamplingParams(stop=("x" * MAX_STOP_STRING_CHARS,)),
        SamplingParams(stop=tuple(str(i) for i in range(MAX_STOP_STRINGS))),
        SamplingParams(max_tokens=MAX_MODEL_LEN - 10),  # exactly fills the context
        SamplingParams(stop_token_ids=(0, 2), ignore_eos=True, seed=7),
        SamplingParams(repetition_penalty=1e-3, presence_penalty=-2.0, frequency_penalty=2.0),
        SamplingParams(repetition_penalty=10.0, presence_penalty=2.0, frequency_penalty=-2.0),
        SamplingParams(min_p=0.0),
        SamplingParams(min_p=1.0),
        SamplingParams(max_tokens=5, min_tokens=5),
        SamplingParams(logit_bias=((0, -100.0), (VOCAB - 1, 100.0))),
        SamplingParams(include_stop_str_in_output=True, stop=("x",)),
        SamplingParams(logprobs=0),
        SamplingParams(logprobs=20),
    ],
)
def test_boundary_values_are_valid(params: SamplingParams) -> None:
    validate_sampling(params, prompt_len=10, max_model_len=MAX_MODEL_LEN, vocab_size=VOCAB)


@pytest.mark.parametrize(
    ("params", "prompt_len", "message"),
    [
        (
            SamplingParams(temperature=-0.1),
            10,
            "temperature must be >= 0 (0 means greedy), got -0.1",
        ),
        (SamplingParams(temperature=math.nan), 10, "temperature must be a finite number, got nan"),
        (SamplingParams(temperature=math.inf), 10, "temperature must be a finite number, got inf"),
        (SamplingParams(top_p=0.0), 10, "top_p must be in (0, 1], got 0.0"),
        (SamplingParams(top_p=1.5), 10, "top_p must be in (0, 1], got 1.5"),
        (SamplingParams(top_p=math.nan), 10, "top_p must be in (0, 1], got nan"),
        (SamplingParams(top_k=-1), 10, "top_k must be >= 0 (0 disables it), got -1"),
        (SamplingParams(max_tokens=0), 10, "max_tokens must be >= 1, got 0"),
        (SamplingParams(max_tokens=-5), 10, "max_tokens must be >= 1, got -5"),
        (
            SamplingParams(max_tokens=100),
            2000,
            "prompt (2000 tokens) + max_tokens (100) = 2100 exceeds the model's context length "
            "of 2048; lower max_tokens to at most 48",
        ),
        (
            SamplingParams(max_tokens=1),
            2048,
            "prompt has 2048 tokens, but the model's context length is 2048",
        ),
        (SamplingParams(stop=("ok", "")), 10, "stop string 1 is empty"),
        (
            SamplingParams(stop=tuple(str(i) for i in range(MAX_STOP_STRINGS + 1))),
            10,
            "at most 16 stop strings are allowed, got 17",
        ),
        (
            SamplingParams(stop=("x" * (MAX_STOP_STRING_CHARS + 1),)),
            10,
            "stop string 0 has 257 characters; at most 256 are allowed",
        ),
        (SamplingParams(stop_token_ids=(2, -3)), 10, "stop_token_ids must be >= 0, got -3"),
        (
            SamplingParams(repetition_penalty=0.0),
            10,
            "repetition_penalty must be > 0 (1 disables it), got 0.0",
        ),
        (
            SamplingParams(repetition_penalty=math.inf),
            10,
            "repetition_penalty must be a finite number, got inf",
        ),
        (
            SamplingParams(presence_penalty=2.01),
            10,
            "presence_penalty must be in [-2, 2], got 2.01",
        ),
        (
            SamplingParams(frequency_penalty=-2.5),
            10,
            "frequency_penalty must be in [-2, 2], got -2.5",
        ),
        (
            SamplingParams(frequency_penalty=math.nan),
            10,
            "frequency_penalty must be a finite number, got nan",
        ),
        (SamplingParams(min_p=-0.1), 10, "min_p must be in [0, 1], got -0.1"),
        (SamplingParams(min_p=1.01), 10, "min_p must be in [0, 1], got 1.01"),
        (SamplingParams(min_p=math.nan), 10, "min_p must be in [0, 1], got nan"),
        (SamplingParams(min_tokens=-1), 10, "min_tokens must be >= 0, got -1"),
        (
            SamplingParams(max_tokens=4, min_tokens=5),
            10,
            "min_tokens (5) must be <= max_tokens (4)",
        ),
        (
            SamplingParams(logit_bias=((VOCAB, 1.0),)),
            10,
            f"logit_bias token id {VOCAB} is outside the model's vocabulary [0, {VOCAB})",
        ),
        (
            SamplingParams(logit_bias=((-1, 1.0),)),
            10,
            "logit_bias token id -1 is outside the model's vocabulary",
        ),
        (
            SamplingParams(logit_bias=((3, 100.5),)),
            10,
            "logit_bias for token 3 must be in [-100, 100], got 100.5",
        ),
        (
            SamplingParams(logit_bias=((3, math.nan),)),
            10,
            "logit_bias for token 3 must be in [-100, 100], got nan",
        ),
        (
            SamplingParams(logit_bias=tuple((i, 1.0) for i in range(1025))),
            10,
            "logit_bias may have at most 1024 entries, got 1025",
        ),
        (SamplingParams(logprobs=21), 10, "logprobs must be in [0, 20]"),
        (SamplingParams(logprobs=-1), 10, "logprobs must be in [0, 20]"),
        # what the wire cannot carry: uint32 ids, 32-bit floats (1e39 -> inf, 1e-50 -> 0)
        (SamplingParams(top_k=2**32), 10, "top_k must be at most 4294967295, got 4294967296"),
        (SamplingParams(stop_token_ids=(VOCAB,)), 10, f"stop_token_ids entry {VOCAB} is outside"),
        (SamplingParams(temperature=1e39), 10, "temperature must be a finite number (at most"),
        (SamplingParams(top_p=1e-50), 10, "top_p must be in (0, 1], got 1e-50"),
        (SamplingParams(repetition_penalty=1e-50), 10, "repetition_penalty must be > 0"),
        (SamplingParams(repetition_penalty=-1e39), 10, "repetition_penalty must be a finite"),
        # would overflow logits / value into NaN and fail the engine step of the whole batch
        (SamplingParams(temperature=1.4e-45), 10, "temperature must be 0 (greedy) or at least"),
        (SamplingParams(repetition_penalty=1e-30), 10, "repetition_penalty must be at least"),
    ],
)
def test_invalid_values_are_rejected_with_a_precise_message(
    params: SamplingParams, prompt_len: int, message: str
) -> None:
    with pytest.raises(InvalidRequestError) as excinfo:
        validate_sampling(
            params, prompt_len=prompt_len, max_model_len=MAX_MODEL_LEN, vocab_size=VOCAB
        )
    assert message in str(excinfo.value)
