"""``pdserve.v1.Decode`` servicer: protos in, domain calls, protos out.

Domain failures are raised, not caught: the server's :class:`~pdserve.interceptors.CallScope`
maps them to a status with :data:`STATUS_CODES`, binds the request id, and admits each
``Generate`` through the server's :class:`~pdserve.grpc_runtime.Lifecycle`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from decode_service.worker import DecodeWorker
from engine.errors import EngineStoppedError, InvalidRequestError
from engine.prefix_summary import PrefixSummary
from engine.sequence import FinishReason
from pdserve.grpc_runtime import BASE_STATUS_CODES, Lifecycle
from pdserve.metrics import WorkerMetrics
from pdserve.proto_convert import (
    FINISH_TO_PROTO,
    sampling_from_proto,
    status_to_proto,
    ticket_to_proto,
)
from pdserve.worker_runtime import load_updates
from protos.pdserve.v1 import worker_pb2, worker_pb2_grpc

STATUS_CODES = dict(BASE_STATUS_CODES)
WORK_METHODS = ("/pdserve.v1.Decode/Generate",)


class DecodeFailedError(EngineStoppedError):
    """The sequence failed inside the worker (e.g. its KV transfer); maps to UNAVAILABLE."""


class DecodeServicer(worker_pb2_grpc.DecodeServicer):
    def __init__(
        self,
        worker: DecodeWorker,
        model_name: str,
        metrics: WorkerMetrics | None = None,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        self.worker = worker
        self.model_name = model_name
        self.metrics = metrics
        self.lifecycle = lifecycle or Lifecycle()
        self.prefixes = PrefixSummary(worker.engine.engine.kv_cache.block_size)

    async def Generate(
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        sampling = sampling_from_proto(request.sampling)
        prompt = list(request.prompt_token_ids)
        if not prompt:
            raise InvalidRequestError("empty prompt_token_ids")
        self.prefixes.record(prompt)
        local = request.mode != worker_pb2.PREFILL_MODE_REMOTE
        if not local:
            remaining = context.time_remaining()
            lease = remaining if remaining is not None else float("inf")
            handle, ticket = self.worker.reserve(request.request_id, prompt, sampling, lease)
        else:
            handle = self.worker.generate_local(request.request_id, prompt, sampling)
        try:
            if not local:
                yield worker_pb2.DecodeResponse(ticket=ticket_to_proto(ticket))
            async for out in handle.outputs():
                if out.finish_reason is FinishReason.ERROR:
                    raise DecodeFailedError(out.error or "decode failed")
                if out.timings is not None and self.metrics is not None:
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

    def _status(self) -> worker_pb2.WorkerStatus:
        stats = self.worker.stats()
        msg = status_to_proto(
            "decode",
            self.model_name,
            stats,
            self.worker.engine.engine.kv_cache.block_size,
            self.worker.pending_transfers(),
            kv_endpoint=self.worker.kv_endpoint,
        )
        life = self.lifecycle
        msg.serving = not life.draining
        msg.awaiting_kv = stats.awaiting_kv
        msg.in_flight = life.in_flight
        msg.max_in_flight = life.max_in_flight
        msg.requests_total = life.total
        msg.max_num_seqs = self.worker.engine.engine.config.scheduler.max_num_seqs
        msg.cached_prefix_hashes.extend(
            self.prefixes.advertised(self.worker.engine.engine.held_prefix_blocks)
        )
        return msg

    async def GetStatus(
        self, request: worker_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerStatus:
        return self._status()

    async def WatchLoad(
        self, request: worker_pb2.WatchLoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.WorkerStatus]:
        async for msg in load_updates(self._status, request.interval_ms, self.lifecycle.stopped):
            yield msg
