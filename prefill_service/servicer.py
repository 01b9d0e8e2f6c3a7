"""``pdserve.v1.Prefill`` servicer: protos in, domain calls, protos out. Errors map here."""

from __future__ import annotations

import grpc
import structlog

from engine.errors import EngineError
from kvtransfer.ticket import IncompatiblePeerError
from pdserve.grpc_runtime import BASE_STATUS_CODES, status_for
from pdserve.proto_convert import (
    FINISH_TO_PROTO,
    sampling_from_proto,
    status_to_proto,
    ticket_from_proto,
)
from prefill_service.worker import PrefillWorker
from protos.pdserve.v1 import worker_pb2, worker_pb2_grpc

log = structlog.get_logger(__name__)

STATUS_CODES = {**BASE_STATUS_CODES, IncompatiblePeerError: grpc.StatusCode.FAILED_PRECONDITION}
# (IncompatiblePeerError is an EngineError: the most specific entry wins in status_for)


class PrefillServicer(worker_pb2_grpc.PrefillServicer):
    def __init__(self, worker: PrefillWorker, model_name: str) -> None:
        self.worker = worker
        self.model_name = model_name

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        with structlog.contextvars.bound_contextvars(request_id=request.request_id):
            if not request.prompt_token_ids:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty prompt_token_ids")
            if not request.HasField("ticket") or len(request.ticket.transfer_id) != 16:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "missing transfer ticket")
            try:
                result = await self.worker.prefill(
                    request.request_id,
                    list(request.prompt_token_ids),
                    sampling_from_proto(request.sampling),
                    ticket_from_proto(request.ticket),
                )
            except EngineError as exc:
                log.warning("prefill_failed", error=str(exc))
                await context.abort(status_for(exc, STATUS_CODES), str(exc))
            return worker_pb2.PrefillResponse(
                first_token_id=result.first_token_id,
                finish_reason=FINISH_TO_PROTO[result.finish_reason],
                prefill_ns=result.prefill_ns,
            )

    async def GetStatus(
        self, request: worker_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerStatus:
        return status_to_proto(
            "prefill",
            self.model_name,
            self.worker.stats(),
            self.worker.engine.engine.kv_cache.block_size,
            self.worker.pending_transfers(),
        )
