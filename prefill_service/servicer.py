"""``pdserve.v1.Prefill`` servicer: protos in, domain calls, protos out.

Domain failures are raised, not caught: the server's :class:`~pdserve.interceptors.CallScope`
maps them to a status with :data:`STATUS_CODES`, binds the request id, and admits each
``Prefill`` through the server's :class:`~pdserve.grpc_runtime.Lifecycle`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import structlog

from engine.errors import EngineError, InvalidRequestError
from engine.prefix_summary import PrefixSummary
from kvtransfer.ticket import IncompatiblePeerError
from pdserve.grpc_runtime import BASE_STATUS_CODES, Lifecycle
from pdserve.proto_convert import (
    FINISH_TO_PROTO,
    sampling_from_proto,
    status_to_proto,
    ticket_from_proto,
)
from pdserve.worker_runtime import load_updates
from prefill_service.worker import PrefillWorker
from protos.pdserve.v1 import worker_pb2, worker_pb2_grpc

log = structlog.get_logger(__name__)

STATUS_CODES = {**BASE_STATUS_CODES, IncompatiblePeerError: grpc.StatusCode.FAILED_PRECONDITION}
# (IncompatiblePeerError is an EngineError: the most specific entry wins in status_for)
WORK_METHODS = ("/pdserve.v1.Prefill/Prefill",)


class PrefillServicer(worker_pb2_grpc.PrefillServicer):
    def __init__(
        self, worker: PrefillWorker, model_name: str, lifecycle: Lifecycle | None = None
    ) -> None:
        self.worker = worker
        self.model_name = model_name
        self.lifecycle = lifecycle or Lifecycle()
        self.prefixes = PrefixSummary(worker.engine.engine.kv_cache.block_size)

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        if not request.prompt_token_ids:
            raise InvalidRequestError("empty prompt_token_ids")
        if not request.HasField("ticket") or len(request.ticket.transfer_id) != 16:
            raise InvalidRequestError("missing transfer ticket")
        prompt = list(request.prompt_token_ids)
        self.prefixes.record(prompt)
        try:
            result = await self.worker.prefill(
                request.request_id,
                prompt,
                sampling_from_proto(request.sampling),
                ticket_from_proto(request.ticket),
            )
        except EngineError as exc:
            log.warning("prefill_failed", error=str(exc))
            raise
        return worker_pb2.PrefillResponse(
            first_token_id=result.first_token_id,
            finish_reason=FINISH_TO_PROTO[result.finish_reason],
            prefill_ns=result.prefill_ns,
        )

    def _status(self) -> worker_pb2.WorkerStatus:
        stats = self.worker.stats()
        msg = status_to_proto(
            "prefill",
            self.model_name,
            stats,
            self.worker.engine.engine.kv_cache.block_size,
            self.worker.pending_transfers(),
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
