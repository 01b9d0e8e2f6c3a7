"""Entry point of a prefill worker (``pdserve prefill``)."""

from __future__ import annotations

import functools

import structlog

from pdserve.grpc_runtime import serve_until_signalled, start_server
from pdserve.worker_runtime import build_engine
from prefill_service.servicer import PrefillServicer
from prefill_service.worker import PrefillConfig, PrefillWorker
from protos.pdserve.v1 import worker_pb2, worker_pb2_grpc

log = structlog.get_logger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name


async def serve(config: PrefillConfig, grace_s: float = 5.0) -> None:
    engine = build_engine(config.engine)
    worker = PrefillWorker(config, engine)
    servicer = PrefillServicer(worker, config.engine.model.model)
    handle = await start_server(
        config.listen,
        [SERVICE_NAME],
        [functools.partial(worker_pb2_grpc.add_PrefillServicer_to_server, servicer)],
    )
    worker.start()
    log.info("prefill_worker_ready", listen=config.listen, port=handle.port)
    try:
        await serve_until_signalled(handle, [SERVICE_NAME], grace_s)
    finally:
        worker.stop()
