"""What a request asks of generation and how it ended: sampling parameters, finish reasons,
per-worker timings. Plain data, shared by every tier and the client side (no torch)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from core.structured_output import StructuredOutput


class FinishReason(enum.Enum):
    """Why a sequence ended (mirrors ``pdserve.v1.FinishReason``)."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class SamplingParams:
    """How to choose each new token. Validated at the gateway (every check a client can fail)
    and again by each worker's servicer for what the engine cannot survive (token ids, ranges);
    the engine trusts these values."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 disables
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: checked on text, by the gateway
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # logits processors (engine/sampler.py applies them in vLLM's order); defaults are neutral
    repetition_penalty: float = 1.0  # > 0; over prompt + output; > 1 discourages repeats
    presence_penalty: float = 0.0  # [-2, 2]; OpenAI's, over output tokens only
    frequency_penalty: float = 0.0  # [-2, 2]; OpenAI's, over output tokens only
    min_p: float = 0.0  # [0, 1]; drop tokens less likely than min_p x the likeliest
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens exist
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) pairs
    include_stop_str_in_output: bool = False  # stop strings: checked on text, by the gateway
    logprobs: int | None = None  # top alternatives per token (0: the chosen one's); None: none
    structured: StructuredOutput | None = None  # constrains the output to a grammar; None: free

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """Uses a penalty that reads the sequence's token ids."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the likeliest alternatives, most likely first
    (``SamplingParams.logprobs`` of them)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) pairs


@dataclass(frozen=True)
class RequestTimings:
    queue_s: float  # arrival -> first scheduled
    prefill_s: float  # first scheduled -> first token (0 when the KV came from elsewhere)
    decode_s: float  # first token -> finish
