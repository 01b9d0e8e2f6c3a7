"""One request's bookkeeping, the same over gRPC and HTTP: the client-observed timing recorded
into the gateway's histograms (TTFT, ITL, E2E), the token counters, and the accepted /
finished / failed log lines.

A request with ``n`` samples is accounted as ``n`` requests (each sample's own TTFT, gaps,
end-to-end time and outcome) whose prompt is counted once: the samples share its KV.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
import structlog

from core.sampling import SamplingParams
from gateway.errors import STATUS_CODES
from gateway.generation import Delta
from server_runtime.grpc_runtime import status_for
from server_runtime.metrics import GatewayMetrics

log = structlog.get_logger(__name__)


@dataclass
class _Sample:
    last: float
    first: bool = True
    ended: float | None = None  # when its finish reason went out
    code: grpc.StatusCode = grpc.StatusCode.CANCELLED  # unless the stream ends otherwise


class RequestClock:
    """Timing and outcome of one admitted request; :meth:`done` records it (call it once)."""

    def __init__(self, metrics: GatewayMetrics | None) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.samples = [_Sample(self.start)]

    @property
    def code(self) -> grpc.StatusCode:
        """Sample 0's outcome (the request's, when it has one sample)."""
        return self.samples[0].code

    def accepted(self, prompt: list[int], sampling: SamplingParams, n: int = 1) -> None:
        extra = {"n": n} if n > 1 else {}
        log.info(
            "request_accepted", prompt_tokens=len(prompt), max_tokens=sampling.max_tokens, **extra
        )
        self.samples = [_Sample(self.start) for _ in range(n)]
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(prompt))

    def delta(self, delta: Delta) -> None:
        """A message sent to the client; a sample's last one (with a finish reason) ends it OK."""
        self.tokens(len(delta.token_ids), delta.index)
        if delta.finish_reason is not None:
            sample = self.samples[delta.index]
            sample.code, sample.ended = grpc.StatusCode.OK, time.monotonic()
            extra = {"sample": delta.index} if len(self.samples) > 1 else {}
            log.info(
                "request_finished",
                finish_reason=delta.finish_reason.value,
                completion_tokens=delta.completion_tokens,
                **extra,
            )

    def tokens(self, count: int, index: int = 0) -> None:
        if self.metrics is None or count == 0:
            return
        sample = self.samples[index]
        now = time.monotonic()
        if sample.first:
            self.metrics.ttft.observe(now - self.start)
            sample.first = False
        else:
            for _ in range(count):  # a message carrying k tokens: k gaps of 1/k each
                self.metrics.itl.observe((now - sample.last) / count)
        self.metrics.generation_tokens.inc(count)
        sample.last = now

    def failed(self, exc: BaseException) -> grpc.StatusCode:
        """The status ``exc`` maps to, for every sample not finished yet (logged: a rejection
        at info, a failure at warning)."""
        code = status_for(exc, STATUS_CODES)
        for sample in self.samples:
            if sample.code is not grpc.StatusCode.OK:
                sample.code = code
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            log.info("request_rejected", code=code.name, error=str(exc))
        else:
            log.warning("request_failed", code=code.name, error=str(exc))
        return code

    def done(self) -> None:
        if self.metrics is not None:
            now = time.monotonic()
            for sample in self.samples:
                self.metrics.e2e.observe((sample.ended or now) - self.start)
                self.metrics.request_done(sample.code.name)
