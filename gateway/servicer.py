"""``pdserve.v1.Generation`` servicer: protos in, domain calls, protos out.

Failures are raised as domain errors; the server's :class:`~server_runtime.interceptors.CallScope`
maps them to a status (with :data:`STATUS_CODES`) once, binds the request id, and admits the
call through the gateway's bounded :class:`~server_runtime.grpc_runtime.Lifecycle`; a request
with ``n`` samples takes ``n - 1`` more slots there (:class:`~gateway.fanout.SampleSlots`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc

from core.errors import EngineError, InvalidRequestError
from gateway.accounting import RequestClock
from gateway.errors import STATUS_CODES
from gateway.fanout import SampleSlots, generate_samples, validate_samples
from gateway.generation import GenerationCore
from gateway.prompts import ChatMessage, ChatPrompt, PromptInput, TextPrompt, TokenPrompt
from gateway.validation import validate_request_id
from protos.pdserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from server_runtime.grpc_runtime import Lifecycle, Refused
from server_runtime.interceptors import REQUEST_ID_KEY, metadata_value
from server_runtime.metrics import GatewayMetrics
from server_runtime.proto_convert import FINISH_TO_PROTO, logprobs_to_proto, sampling_from_proto

__all__ = [
    "STATUS_CODES",
    "WORK_METHODS",
    "GenerationServicer",
    "prompt_from_proto",
    "samples_from_proto",
]

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


def samples_from_proto(request: generation_pb2.GenerateRequest) -> int:
    """``n``, checked: unset is 1."""
    n = request.n if request.HasField("n") else 1
    validate_samples(n)
    return n


def _request_id_source(request_id: str, context: grpc.aio.ServicerContext) -> str:
    """Where the client put the request id: the field, or the metadata it was copied from."""
    given = metadata_value(context.invocation_metadata(), REQUEST_ID_KEY)
    return f"{REQUEST_ID_KEY} metadata" if given == request_id else "request_id"


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    """``lifecycle``: the server's (the interceptor admits each call once; samples beyond the
    first take their slots here); None: samples are not bounded separately."""

    def __init__(
        self,
        core: GenerationCore,
        metrics: GatewayMetrics | None = None,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        self.core = core
        self.metrics = metrics
        self.lifecycle = lifecycle

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        request_id = request.request_id or uuid.uuid4().hex  # CallScope fills it in, normally
        clock = RequestClock(self.metrics)
        slots = SampleSlots(None, 1)
        try:
            validate_request_id(request_id, _request_id_source(request_id, context))
            sampling = sampling_from_proto(request.sampling)
            n = samples_from_proto(request)
            prompt = self.core.prepare(prompt_from_proto(request), sampling)
            slots = SampleSlots(self.lifecycle, n)
            await slots.take()
            clock.accepted(prompt, sampling, n)
            stream = generate_samples(
                self.core, request_id, prompt, sampling, n, context.time_remaining()
            )
            async for delta in stream:
                clock.delta(delta)
                usage = common_pb2.Usage(
                    prompt_tokens=delta.prompt_tokens,
                    completion_tokens=delta.completion_tokens,
                    cached_tokens=delta.cached_tokens,
                )
                yield generation_pb2.GenerateResponse(
                    request_id=request_id,
                    token_ids=delta.token_ids,
                    text=delta.text,
                    finish_reason=FINISH_TO_PROTO[delta.finish_reason],
                    usage=usage,
                    seed=delta.seed,  # None (unset) but on a sampled sample's first message
                    logprobs=logprobs_to_proto(delta.logprobs),
                    index=delta.index,
                )
        except (EngineError, Refused) as exc:
            clock.failed(exc)
            raise
        finally:
            slots.release()
            clock.done()
