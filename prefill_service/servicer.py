"""``pdserve.v1.Prefill`` servicer: protos in, domain calls, protos out.

Domain failures are raised, not caught: the server's :class:`~server_runtime.interceptors.CallScope`
maps them to a status with :data:`STATUS_CODES`, binds the request id, and admits each
``Prefill`` through the server's :class:`~server_runtime.grpc_runtime.Lifecycle`.
"""

from __future__ import annotations

import grpc
import structlog

from core.errors import EngineError, InvalidRequestError
from core.ticket import IncompatiblePeerError
from prefill_service.worker import PrefillWorker
from protos.pdserve.v1 import worker_pb2, worker_pb2_grpc
from server_runtime.grpc_runtime import BASE_STATUS_CODES, Lifecycle
from server_runtime.proto_convert import (
    FINISH_TO_PROTO,
    logprob_to_proto,
    sampling_from_proto,
    ticket_from_proto,
)
from server_runtime.request_checks import check_request
from server_runtime.worker_runtime import Tier
from server_runtime.worker_servicer import LoadReporting

log = structlog.get_logger(__name__)

STATUS_CODES = {**BASE_STATUS_CODES, IncompatiblePeerError: grpc.StatusCode.ABORTED}
# IncompatiblePeerError (a ticket this worker cannot serve: another model, block layout or KV
# endpoint) is ABORTED: the caller should restart the sequence elsewhere, as the gateway does
# (reserve on another decode worker), not give up. It is an EngineError: the most specific entry
# wins in status_for.
WORK_METHODS = ("/pdserve.v1.Prefill/Prefill",)
TIER = Tier(
    "prefill",
    worker_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name,
    worker_pb2_grpc.add_PrefillServicer_to_server,
    WORK_METHODS,
    STATUS_CODES,
)


class PrefillServicer(LoadReporting, worker_pb2_grpc.PrefillServicer):
    tier = TIER.name

    def __init__(
        self, worker: PrefillWorker, model_name: str, lifecycle: Lifecycle | None = None
    ) -> None:
        super().__init__(worker, model_name, lifecycle)
        self.worker: PrefillWorker = worker

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        prompt = list(request.prompt_token_ids)
        sampling = sampling_from_proto(request.sampling)
        check_request(prompt, sampling, self.worker.engine.spec)
        if not request.HasField("ticket") or len(request.ticket.transfer_id) != 16:
            raise InvalidRequestError("missing transfer ticket")
        self.record_prompt(prompt)
        try:
            result = await self.worker.prefill(
                request.request_id,
                prompt,
                sampling,
                ticket_from_proto(request.ticket),
                request.resumed_tokens,
            )
        except EngineError as exc:
            log.warning("prefill_failed", error=str(exc))
            raise
        reply = worker_pb2.PrefillResponse(
            first_token_id=result.first_token_id,
            finish_reason=FINISH_TO_PROTO[result.finish_reason],
            prefill_ns=result.prefill_ns,
            cached_tokens=result.cached_tokens,
        )
        if result.first_logprob is not None:
            reply.first_logprob.CopyFrom(logprob_to_proto(result.first_logprob))
        return reply
