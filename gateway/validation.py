"""Validation of sampling parameters and request ids at the gateway's edge.

The engine trusts :class:`~engine.sequence.SamplingParams`; every check a client can fail lives
here and raises :class:`~core.errors.InvalidRequestError` with a message naming the field,
the value and the allowed range (it reaches the client as gRPC INVALID_ARGUMENT).
"""

from __future__ import annotations

import math
import struct

from core.errors import InvalidRequestError
from core.sampling import SamplingParams
from server_runtime.interceptors import REQUEST_ID_RULE, request_id_problem

DEFAULT_MAX_TOKENS = 16  # completion length when the client does not say
MAX_STOP_STRINGS = 16  # more would make per-token stop checks costly
MAX_STOP_STRING_CHARS = 256  # bounds the text the stop matcher may hold back
MAX_PENALTY = 2.0  # presence and frequency penalties: OpenAI's [-2, 2]
MAX_LOGIT_BIAS = 100.0  # OpenAI's [-100, 100]
MAX_LOGIT_BIAS_ENTRIES = 1024  # bounds the sampler's per-step work for one request
MAX_LOGPROBS = 20  # top alternatives per token, as vLLM's and OpenAI's limit
MIN_TEMPERATURE = 1e-4  # smaller (but not 0) overflows logits / temperature: NaN in the sampler
MIN_REPETITION_PENALTY = 1e-4  # the same: positive logits are divided by it
MAX_UINT32 = 2**32 - 1  # top_k and token ids travel to the workers as uint32
FLOAT32_MAX = 3.4028234663852886e38  # the floats travel as 32-bit floats


def as_sent(value: float) -> float:
    """``value`` as the workers receive it, a 32-bit float: 1e39 arrives as inf, 1e-50 as 0.
    Ranges are checked on this value (the HTTP API parses 64-bit floats)."""
    try:
        return float(struct.unpack("f", struct.pack("f", value))[0])
    except OverflowError:
        return math.copysign(math.inf, value)


def validate_request_id(value: str, field: str = "request_id") -> None:
    """Raise InvalidRequestError unless ``value`` can be a request id (it travels to every
    worker as gRPC metadata; :data:`~server_runtime.interceptors.REQUEST_ID_RULE`); ``field``
    names where the client put it."""
    problem = request_id_problem(value)
    if problem is not None:
        raise InvalidRequestError(f"{field} {problem}; a request id must be {REQUEST_ID_RULE}")


def validate_sampling(
    params: SamplingParams, prompt_len: int, max_model_len: int, vocab_size: int | None = None
) -> None:
    """Raise InvalidRequestError unless ``params`` can be served for a ``prompt_len`` prompt;
    ``vocab_size`` bounds the token ids of ``logit_bias`` and ``stop_token_ids`` (None: only
    what the wire can carry)."""
    _check_sampling_ranges(params, vocab_size)
    _check_lengths(params.max_tokens, prompt_len, max_model_len)
    _check_processors(params, vocab_size)
    _check_stop_strings(params.stop)


def _check_sampling_ranges(params: SamplingParams, vocab_size: int | None) -> None:
    _finite("temperature", params.temperature)
    if params.temperature < 0:
        raise InvalidRequestError(
            f"temperature must be >= 0 (0 means greedy), got {params.temperature}"
        )
    if 0 < params.temperature < MIN_TEMPERATURE:
        raise InvalidRequestError(
            f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, "
            f"got {params.temperature}"
        )
    if math.isnan(params.top_p) or not 0 < as_sent(params.top_p) <= 1:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise InvalidRequestError(f"top_k must be >= 0 (0 disables it), got {params.top_k}")
    if params.top_k > MAX_UINT32:
        raise InvalidRequestError(f"top_k must be at most {MAX_UINT32}, got {params.top_k}")
    for token_id in params.stop_token_ids:
        if token_id < 0:
            raise InvalidRequestError(f"stop_token_ids must be >= 0, got {token_id}")
        bound = MAX_UINT32 + 1 if vocab_size is None else vocab_size
        if token_id >= bound:
            raise InvalidRequestError(
                f"stop_token_ids entry {token_id} is outside the model's vocabulary [0, {bound})"
            )
    if params.logprobs is not None and not 0 <= params.logprobs <= MAX_LOGPROBS:
        raise InvalidRequestError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {params.logprobs}")


def _finite(name: str, value: float) -> None:
    if math.isnan(value) or math.isinf(as_sent(value)):
        bound = f" (at most {FLOAT32_MAX:.6g} in size)" if math.isfinite(value) else ""
        raise InvalidRequestError(f"{name} must be a finite number{bound}, got {value}")


def _check_processors(params: SamplingParams, vocab_size: int | None) -> None:
    _finite("repetition_penalty", params.repetition_penalty)
    if as_sent(params.repetition_penalty) <= 0:
        raise InvalidRequestError(
            f"repetition_penalty must be > 0 (1 disables it), got {params.repetition_penalty}"
        )
    if params.repetition_penalty < MIN_REPETITION_PENALTY:
        raise InvalidRequestError(
            f"repetition_penalty must be at least {MIN_REPETITION_PENALTY:g}, "
            f"got {params.repetition_penalty}"
        )
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        _finite(name, value)
        if not -MAX_PENALTY <= value <= MAX_PENALTY:
            raise InvalidRequestError(
                f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}"
            )
    if math.isnan(params.min_p) or not 0 <= params.min_p <= 1:
        raise InvalidRequestError(f"min_p must be in [0, 1], got {params.min_p}")
    if params.min_tokens < 0:
        raise InvalidRequestError(f"min_tokens must be >= 0, got {params.min_tokens}")
    if params.min_tokens > params.max_tokens:
        raise InvalidRequestError(
            f"min_tokens ({params.min_tokens}) must be <= max_tokens ({params.max_tokens})"
        )
    if len(params.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidRequestError(
            f"logit_bias may have at most {MAX_LOGIT_BIAS_ENTRIES} entries, "
            f"got {len(params.logit_bias)}"
        )
    for token_id, bias in params.logit_bias:
        if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
            bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise InvalidRequestError(
                f"logit_bias token id {token_id} is outside the model's vocabulary {bound}"
            )
        if math.isnan(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise InvalidRequestError(
                f"logit_bias for token {token_id} must be in "
                f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias}"
            )


def _check_lengths(max_tokens: int, prompt_len: int, max_model_len: int) -> None:
    if max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be >= 1, got {max_tokens}")
    if prompt_len >= max_model_len:
        raise InvalidRequestError(
            f"prompt has {prompt_len} tokens, but the model's context length is "
            f"{max_model_len}: the prompt must be shorter to leave room for output"
        )
    if prompt_len + max_tokens > max_model_len:
        raise InvalidRequestError(
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = "
            f"{prompt_len + max_tokens} exceeds the model's context length of {max_model_len}; "
            f"lower max_tokens to at most {max_model_len - prompt_len}"
        )


def _check_stop_strings(stop: tuple[str, ...]) -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(
            f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stop)}"
        )
    for index, s in enumerate(stop):
        if not s:
            raise InvalidRequestError(f"stop string {index} is empty")
        if len(s) > MAX_STOP_STRING_CHARS:
            raise InvalidRequestError(
                f"stop string {index} has {len(s)} characters; at most "
                f"{MAX_STOP_STRING_CHARS} are allowed"
            )
