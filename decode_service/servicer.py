"""``pdserve.v1.Decode`` servicer: protos in, domain calls, protos out. Errors map here."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import structlog

from decode_service.worker import DecodeWorker
from engine.errors import EngineError
from engine.sequence import FinishReason
from pdserve.grpc_runtime import BASE_STATUS_CODES, status_for
from pdserve.metrics import WorkerMetrics
from pdserve.proto_convert import (
    FINISH_TO_PROTO,
    sampling_from_proto,
    status_to_proto,
    ticket_to_proto,
)
from protos.pdserve.v1 import worker_pb2, worker_pb2_grpc

log = structlog.get_logger(__name__)

STATUS_CODES = dict(BASE_STATUS_CODES)


class DecodeServicer(worker_pb2_grpc.DecodeServicer):
    def __init__(
        self, worker: DecodeWorker, model_name: str, metrics: WorkerMetrics | None = None
    ) -> None:
        self.worker = worker
        self.model_name = model_name
        self.metrics = metrics

    async def Generate(
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        structlog.contextvars.bind_contextvars(request_id=request.request_id)
        sampling = sampling_from_proto(request.sampling)
        prompt = list(request.prompt_token_ids)
        if not prompt:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty prompt_token_ids")
        try:
            if request.mode == worker_pb2.PREFILL_MODE_REMOTE:
                remaining = context.time_remaining()
                lease = remaining if remaining is not None else float("inf")
                handle, ticket = self.worker.reserve(request.request_id, prompt, sampling, lease)
                yield worker_pb2.DecodeResponse(ticket=ticket_to_proto(ticket))
            else:
                handle = self.worker.generate_local(request.request_id, prompt, sampling)
        except EngineError as exc:
            await context.abort(status_for(exc, STATUS_CODES), str(exc))
        try:
            async for out in handle.outputs():
                if out.finish_reason is FinishReason.ERROR:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, out.error or "decode failed")
                if out.timings is not None and self.metrics is not None:
                    local = request.mode != worker_pb2.PREFILL_MODE_REMOTE
                    generated = out.num_completion_tokens - (0 if local else 1)
                    self.metrics.observe(out.timings, len(prompt) if local else 0, generated)
                yield worker_pb2.DecodeResponse(
                    tokens=worker_pb2.TokenChunk(
                        token_ids=out.token_ids,
                        finish_reason=FINISH_TO_PROTO[out.finish_reason],
                        completion_tokens=out.num_completion_tokens,
                    )
                )
        finally:
            self.worker.release(handle)
            structlog.contextvars.unbind_contextvars("request_id")

    async def GetStatus(
        self, request: worker_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerStatus:
        return status_to_proto(
            "decode",
            self.model_name,
            self.worker.stats(),
            self.worker.engine.engine.kv_cache.block_size,
            self.worker.pending_transfers(),
            kv_endpoint=self.worker.kv_endpoint,
        )
