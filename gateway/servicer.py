"""``pdserve.v1.Generation`` servicer: protos in, domain calls, protos out. Errors map here."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import structlog

from engine.errors import EngineError, InvalidRequestError
from gateway.errors import NoWorkersError, UpstreamError
from gateway.generation import GenerationCore
from gateway.prompts import ChatMessage, ChatPrompt, PromptInput, TextPrompt, TokenPrompt
from pdserve.grpc_runtime import BASE_STATUS_CODES, status_for
from pdserve.proto_convert import FINISH_TO_PROTO, sampling_from_proto
from protos.pdserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

log = structlog.get_logger(__name__)

STATUS_CODES = {**BASE_STATUS_CODES, NoWorkersError: grpc.StatusCode.UNAVAILABLE}


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


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, core: GenerationCore) -> None:
        self.core = core

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        request_id = request.request_id or uuid.uuid4().hex
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                sampling = sampling_from_proto(request.sampling)
                prompt = self.core.prepare(prompt_from_proto(request), sampling)
                log.info(
                    "request_accepted", prompt_tokens=len(prompt), max_tokens=sampling.max_tokens
                )
                stream = self.core.generate(request_id, prompt, sampling, context.time_remaining())
                async for delta in stream:
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
                        log.info(
                            "request_finished",
                            finish_reason=delta.finish_reason.value,
                            completion_tokens=delta.completion_tokens,
                        )
            except UpstreamError as exc:
                log.warning("request_failed", code=exc.code.name, error=str(exc))
                await context.abort(exc.code, str(exc))
            except EngineError as exc:
                code = status_for(exc, STATUS_CODES)
                log.info("request_rejected", code=code.name, error=str(exc))
                await context.abort(code, str(exc))
