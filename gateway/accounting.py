"""One request's bookkeeping, the same over gRPC and HTTP: the client-observed timing recorded
into the gateway's histograms (TTFT, ITL, E2E), the token counters, and the accepted /
finished / failed log lines."""

from __future__ import annotations

import time

import grpc
import structlog

from core.sampling import SamplingParams
from gateway.errors import STATUS_CODES
from gateway.generation import Delta
from server_runtime.grpc_runtime import status_for
from server_runtime.metrics import GatewayMetrics

log = structlog.get_logger(__name__)


class RequestClock:
    """Timing and outcome of one admitted request; :meth:`done` records it (call it once)."""

    def __init__(self, metrics: GatewayMetrics | None) -> None:
        self.metrics = metrics
        self.start = self.last = time.monotonic()
        self.first = True
        self.code = grpc.StatusCode.CANCELLED  # unless the stream ends otherwise

    def accepted(self, prompt: list[int], sampling: SamplingParams) -> None:
        log.info("request_accepted", prompt_tokens=len(prompt), max_tokens=sampling.max_tokens)
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(prompt))

    def delta(self, delta: Delta) -> None:
        """A message sent to the client; the last one (with a finish reason) ends it OK."""
        self.tokens(len(delta.token_ids))
        if delta.finish_reason is not None:
            self.code = grpc.StatusCode.OK
            log.info(
                "request_finished",
                finish_reason=delta.finish_reason.value,
                completion_tokens=delta.completion_tokens,
            )

    def tokens(self, count: int) -> None:
        if self.metrics is None or count == 0:
            return
        now = time.monotonic()
        if self.first:
            self.metrics.ttft.observe(now - self.start)
            self.first = False
        else:
            for _ in range(count):  # a message carrying k tokens: k gaps of 1/k each
                self.metrics.itl.observe((now - self.last) / count)
        self.metrics.generation_tokens.inc(count)
        self.last = now

    def failed(self, exc: BaseException) -> grpc.StatusCode:
        """The status ``exc`` maps to (logged: a rejection at info, a failure at warning)."""
        self.code = status_for(exc, STATUS_CODES)
        if self.code is grpc.StatusCode.INVALID_ARGUMENT:
            log.info("request_rejected", code=self.code.name, error=str(exc))
        else:
            log.warning("request_failed", code=self.code.name, error=str(exc))
        return self.code

    def done(self) -> None:
        if self.metrics is not None:
            self.metrics.e2e.observe(time.monotonic() - self.start)
            self.metrics.request_done(self.code.name)
