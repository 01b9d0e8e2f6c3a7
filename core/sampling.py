"""What a request asks of generation and how it ended: sampling parameters, finish reasons,
per-worker timings. Plain data, shared by every tier and the client side (no torch)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FinishReason(enum.Enum):
    """Why a sequence ended (mirrors ``pdserve.v1.FinishReason``)."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class SamplingParams:
    """How to choose each new token. Validated at the gateway; the engine trusts these values."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 disables
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: checked on text, by the gateway
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True)
class RequestTimings:
    queue_s: float  # arrival -> first scheduled
    prefill_s: float  # first scheduled -> first token (0 when the KV came from elsewhere)
    decode_s: float  # first token -> finish
