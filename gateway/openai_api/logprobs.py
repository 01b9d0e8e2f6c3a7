"""Log-probabilities in the OpenAI shapes, as vLLM's server writes them.

Each token's string is its id decoded alone (as vLLM does), so a character split over several
tokens shows as replacement characters in each; ``bytes`` (chat) is that string's UTF-8.
``-inf`` (a token masked by ``logit_bias`` or ``min_tokens``) is written as -9999.0, vLLM's
stand-in, because JSON has no infinity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import grpc
from transformers import PreTrainedTokenizerBase

from core.errors import InvalidRequestError
from core.sampling import TokenLogprob
from gateway.openai_api import protocol as p
from gateway.openai_api.errors import APIError
from gateway.validation import MAX_LOGPROBS

NEG_INF_STANDIN = -9999.0


def completion_logprobs_of(request: p.CompletionRequest) -> int | None:
    """Completions' ``logprobs: N`` (range checked by validation, which names it)."""
    return request.logprobs


def chat_logprobs_of(request: p.ChatCompletionRequest) -> int | None:
    """Chat's ``logprobs: true`` with ``top_logprobs: N`` (default 0); None when not asked."""
    top = request.top_logprobs
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise APIError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {top}",
            param="top_logprobs",
        )
    if not request.logprobs:
        if top:
            raise InvalidRequestError("top_logprobs is only allowed when logprobs is true")
        return None
    return top or 0


def _value(logprob: float) -> float:
    return max(logprob, NEG_INF_STANDIN) if not math.isnan(logprob) else NEG_INF_STANDIN


class LogprobFormatter:
    """Turns :class:`TokenLogprob` into either API's shape; holds the completions' running
    ``text_offset`` across the chunks of one stream."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.offset = 0
        self._strings: dict[int, str] = {}

    def token(self, token_id: int) -> str:
        known = self._strings.get(token_id)
        if known is not None:
            return known
        text = str(self.tokenizer.decode([token_id]))
        self._strings[token_id] = text
        return text

    def completion(self, logprobs: Sequence[TokenLogprob]) -> p.CompletionLogprobs | None:
        if not logprobs:
            return None
        out = p.CompletionLogprobs()
        for lp in logprobs:
            text = self.token(lp.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(_value(lp.logprob))
            top: dict[str, float] = {}
            for t, v in ((lp.token_id, lp.logprob), *lp.top):  # strings that decode alike
                top.setdefault(self.token(t), _value(v))  # keep the chosen or likeliest
            out.top_logprobs.append(top)
            out.text_offset.append(self.offset)
            self.offset += len(text)
        return out

    def chat(self, logprobs: Sequence[TokenLogprob]) -> p.ChatLogprobs | None:
        if not logprobs:
            return None
        return p.ChatLogprobs(
            content=[
                p.ChatTokenLogprob(
                    **self._top(lp.token_id, lp.logprob).model_dump(),
                    top_logprobs=[self._top(t, v) for t, v in lp.top],
                )
                for lp in logprobs
            ]
        )

    def _top(self, token_id: int, logprob: float) -> p.TopLogprob:
        text = self.token(token_id)
        return p.TopLogprob(token=text, logprob=_value(logprob), bytes=list(text.encode()))
