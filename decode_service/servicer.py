"""``pdserve.v1.Decode`` servicer: protos in, domain calls, protos out.

Domain failures are raised, not caught: the server's :class:`~server_runtime.interceptors.CallScope`
maps them to a status with :data:`STATUS_CODES`, binds the request id, and admits each
``Generate`` through the server's :class:`~server_runtime.grpc_runtime.Lifecycle`.

Migration: when the server drains (SIGTERM) the worker parks its decoding sequences; each one's
``Generate`` stream says ``migrating`` after its last token and stays open while the gateway
moves it (``Migrate``, with another worker's ticket) or lets it finish here (``Migrate``
without a ticket); the gateway cancels the call once the sequence is elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from core.errors import EngineStoppedError, InvalidRequestError
from core.sampling import FinishReason
from decode_service.worker import DecodeWorker, MigrationFailedError, NotParkedError
from engine.async_engine import RequestHandle
from engine.engine import RequestOutput
from protos.pdserve.v1 import worker_pb2, worker_pb2_grpc
from server_runtime.grpc_runtime import BASE_STATUS_CODES, Lifecycle
from server_runtime.metrics import WorkerMetrics
from server_runtime.proto_convert import (
    FINISH_TO_PROTO,
    logprobs_to_proto,
    sampling_from_proto,
    ticket_from_proto,
    ticket_to_proto,
)
from server_runtime.request_checks import check_request
from server_runtime.worker_runtime import Tier
from server_runtime.worker_servicer import LoadReporting

STATUS_CODES = {
    **BASE_STATUS_CODES,
    NotParkedError: grpc.StatusCode.FAILED_PRECONDITION,
    MigrationFailedError: grpc.StatusCode.UNAVAILABLE,
}
WORK_METHODS = ("/pdserve.v1.Decode/Generate",)
TIER = Tier(
    "decode",
    worker_pb2.DESCRIPTOR.services_by_name["Decode"].full_name,
    worker_pb2_grpc.add_DecodeServicer_to_server,
    WORK_METHODS,
    STATUS_CODES,
)


class DecodeFailedError(EngineStoppedError):
    """The sequence failed inside the worker (e.g. its KV transfer); maps to UNAVAILABLE."""


class DecodeServicer(LoadReporting, worker_pb2_grpc.DecodeServicer):
    tier = TIER.name

    def __init__(
        self,
        worker: DecodeWorker,
        model_name: str,
        metrics: WorkerMetrics | None = None,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        super().__init__(worker, model_name, lifecycle)
        self.worker: DecodeWorker = worker
        self.metrics = metrics
        if lifecycle is not None and worker.config.migrate:
            lifecycle.on_drain(worker.park_all)

    async def Generate(
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        sampling = sampling_from_proto(request.sampling)
        prompt = list(request.prompt_token_ids)
        check_request(prompt, sampling, self.worker.engine.spec)
        self.record_prompt(prompt)
        local = request.mode != worker_pb2.PREFILL_MODE_REMOTE
        if not local:
            remaining = context.time_remaining()
            lease = remaining if remaining is not None else float("inf")
            handle, ticket = self.worker.reserve(
                request.request_id, prompt, sampling, lease, request.resumed_tokens
            )
        else:
            handle = self.worker.generate_local(
                request.request_id, prompt, sampling, request.resumed_tokens
            )
        try:
            if not local:
                yield worker_pb2.DecodeResponse(ticket=ticket_to_proto(ticket))
                arrived, first_out = await self._until_pages_arrive(handle)
                if arrived:
                    yield worker_pb2.DecodeResponse(kv_arrived=worker_pb2.KvArrived())
                first_out = first_out or await handle.next_output()
                yield self._response(first_out, prompt, local, first=True)
                if first_out.finish_reason is not None:
                    return
            first = local
            async for out in handle.outputs():
                if out.parked:  # draining: the gateway moves it, or lets it go on here
                    migrating = worker_pb2.Migrating(
                        key=handle.key, completion_tokens=out.num_completion_tokens
                    )
                    yield worker_pb2.DecodeResponse(migrating=migrating)
                    continue
                yield self._response(out, prompt, local, first)
                first = False
        finally:
            self.worker.release(handle)

    async def Migrate(
        self, request: worker_pb2.MigrateRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.MigrateResponse:
        if not request.HasField("ticket"):
            self.worker.keep(request.key)
            return worker_pb2.MigrateResponse()
        sent = await self.worker.migrate(request.key, ticket_from_proto(request.ticket))
        return worker_pb2.MigrateResponse(bytes=sent)

    async def _until_pages_arrive(self, handle: RequestHandle) -> tuple[bool, RequestOutput | None]:
        """Wait for the reservation's pages, or the request's first output if that comes
        first (its transfer failed). Returns whether the pages arrived, and the output if one
        was read already."""
        arrival = self.worker.arrival(handle)
        output = asyncio.ensure_future(handle.next_output())
        either: set[asyncio.Future[Any]] = {arrival, output}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            output.cancel()
            raise
        arrived = arrival.done() and not arrival.cancelled()
        if arrived and not output.done():
            output.cancel()  # nothing was taken from the output queue: next_output reads on
            await asyncio.gather(output, return_exceptions=True)
            return True, None
        return arrived, await output

    def _response(
        self, out: RequestOutput, prompt: list[int], local: bool, first: bool
    ) -> worker_pb2.DecodeResponse:
        if out.finish_reason is FinishReason.ERROR:
            if out.invalid_request:  # e.g. its grammar: the same on any worker
                raise InvalidRequestError(out.error or "invalid request")
            raise DecodeFailedError(out.error or "decode failed")
        if out.timings is not None and self.metrics is not None:
            generated = out.num_completion_tokens - (0 if local else 1)
            self.metrics.observe(out.timings, len(prompt) if local else 0, generated)
        chunk = worker_pb2.TokenChunk(
            token_ids=out.token_ids,
            finish_reason=FINISH_TO_PROTO[out.finish_reason],
            completion_tokens=out.num_completion_tokens,
            logprobs=logprobs_to_proto(out.logprobs),
        )
        if local and first:  # the prefix-cache hit of the prompt computed here
            chunk.cached_tokens = out.num_cached_tokens
        return worker_pb2.DecodeResponse(tokens=chunk)

    def kv_endpoint(self) -> str:
        return self.worker.kv_endpoint
