"""``pdserve.v1.Generation`` servicer: protos in, domain calls, protos out.

Failures are raised as domain errors; the server's :class:`~server_runtime.interceptors.CallScope`
maps them to a status (with :data:`STATUS_CODES`) once, binds the request id, and admits the
call through the gateway's bounded :class:`~server_runtime.grpc_runtime.Lifecycle`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import grpc
import structlog

from core.errors import EngineError, InvalidRequestError
from gateway.errors import NoWorkersError, OverloadedError
from gateway.generation import GenerationCore
from gateway.prompts import ChatMessage, ChatPrompt, PromptInput, TextPrompt, TokenPrompt
from protos.pdserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from server_runtime.grpc_runtime import BASE_STATUS_CODES, status_for
from server_runtime.metrics import GatewayMetrics
from server_runtime.proto_convert import FINISH_TO_PROTO, sampling_from_proto

log = structlog.get_logger(__name__)

STATUS_CODES = {
    **BASE_STATUS_CODES,
    NoWorkersError: grpc.StatusCode.UNAVAILABLE,
    OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
WORK_METHODS = ("/pdserve.v1.Generation/Generate",)


def prompt_from_proto(request: generation_pb2.GenerateRequest) -> PromptInput:
    given = [
        name
        for name, present in (
            ("prompt", request.HasField("prompt")),
            ("prompt_token_ids", len(request.prompt_token_ids) > 0),
            ("messages", len(request.messages) > 0),
        )
        if present
    ]
    if not given:
        raise InvalidRequestError("no input: set one of prompt, prompt_token_ids or messages")
    if len(given) > 1:
        raise InvalidRequestError(f"set exactly one input, got {' and '.join(given)}")
    if request.HasField("prompt"):
        return TextPrompt(request.prompt)
    if request.prompt_token_ids:
        return TokenPrompt(tuple(request.prompt_token_ids))
    return ChatPrompt(tuple(ChatMessage(m.role, m.content) for m in request.messages))


class _Clock:
    """Client-observed timing of one request, recorded into the gateway's histograms."""

    def __init__(self, metrics: GatewayMetrics | None) -> None:
        self.metrics = metrics
        self.start = self.last = time.monotonic()
        self.first = True

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

    def done(self, code: grpc.StatusCode) -> None:
        if self.metrics is not None:
            self.metrics.e2e.observe(time.monotonic() - self.start)
            self.metrics.request_done(code.name)


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, core: GenerationCore, metrics: GatewayMetrics | None = None) -> None:
        self.core = core
        self.metrics = metrics

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        request_id = request.request_id or uuid.uuid4().hex
        clock = _Clock(self.metrics)
        code = grpc.StatusCode.CANCELLED  # unless the stream ends otherwise
        try:
            sampling = sampling_from_proto(request.sampling)
            prompt = self.core.prepare(prompt_from_proto(request), sampling)
            log.info("request_accepted", prompt_tokens=len(prompt), max_tokens=sampling.max_tokens)
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(len(prompt))
            stream = self.core.generate(request_id, prompt, sampling, context.time_remaining())
            async for delta in stream:
                clock.tokens(len(delta.token_ids))
                usage = common_pb2.Usage(
                    prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens
                )
                yield generation_pb2.GenerateResponse(
                    request_id=request_id,
                    token_ids=delta.token_ids,
                    text=delta.text,
                    finish_reason=FINISH_TO_PROTO[delta.finish_reason],
                    usage=usage,
                )
                if delta.finish_reason is not None:
                    code = grpc.StatusCode.OK
                    log.info(
                        "request_finished",
                        finish_reason=delta.finish_reason.value,
                        completion_tokens=delta.completion_tokens,
                    )
        except EngineError as exc:
            code = status_for(exc, STATUS_CODES)
            if code is grpc.StatusCode.INVALID_ARGUMENT:
                log.info("request_rejected", code=code.name, error=str(exc))
            else:
                log.warning("request_failed", code=code.name, error=str(exc))
            raise
        finally:
            clock.done(code)
