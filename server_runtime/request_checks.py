"""The checks a worker makes on a request that came straight to it, not through the gateway:
the ones without which an engine step would fail for every sequence in its batch. Both tiers'
servicers call :func:`check_request` before the engine sees the request."""

from __future__ import annotations

import math

from core.errors import InvalidRequestError
from core.sampling import SamplingParams
from engine.model_files import ModelSpec


def check_request(prompt: list[int], sampling: SamplingParams, spec: ModelSpec) -> None:
    """Raise InvalidRequestError unless the engine can run this request as it came. A call
    straight to this worker skips the gateway's checks (gateway/validation.py): these are the
    ones without which an engine step fails, for every sequence of its batch (a token id past
    the embedding, a NaN in the logits: a temperature or repetition penalty under 1e-4 overflows
    the logits it divides)."""
    vocab, limit = spec.vocab_size, spec.max_model_len
    if not prompt:
        raise InvalidRequestError("empty prompt_token_ids")
    ids = [*prompt, *(t for t, _ in sampling.logit_bias)]
    outside = next((t for t in ids if t >= vocab), None)
    if outside is not None:
        raise InvalidRequestError(f"token id {outside} is outside the vocabulary [0, {vocab})")
    if not 1 <= sampling.max_tokens <= limit - len(prompt):
        raise InvalidRequestError(
            f"max_tokens ({sampling.max_tokens}) must be >= 1 and fit the context length "
            f"{limit} after the prompt's {len(prompt)} tokens"
        )
    s = sampling
    rules = {  # field: (value, whether it is in range, the range)
        "temperature": (
            s.temperature,
            s.temperature == 0 or s.temperature >= 1e-4,
            " >= 1e-4 or 0",
        ),
        "top_p": (s.top_p, 0 < s.top_p <= 1, " in (0, 1]"),
        "min_p": (s.min_p, 0 <= s.min_p <= 1, " in [0, 1]"),
        "repetition_penalty": (s.repetition_penalty, s.repetition_penalty >= 1e-4, " >= 1e-4"),
        "presence_penalty": (s.presence_penalty, True, ""),
        "frequency_penalty": (s.frequency_penalty, True, ""),
        **{f"logit_bias[{t}]": (bias, True, "") for t, bias in s.logit_bias},
    }
    for name, (value, in_range, rule) in rules.items():
        if not (math.isfinite(value) and in_range):
            raise InvalidRequestError(f"{name} must be a finite number{rule}, got {value}")
    if sampling.logprobs is not None and sampling.logprobs > vocab:
        raise InvalidRequestError(f"logprobs ({sampling.logprobs}) exceeds the vocabulary")
