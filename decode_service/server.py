"""Entry point of a decode worker (``pdserve decode``)."""

from __future__ import annotations

import functools

import structlog

from decode_service.servicer import DecodeServicer
from decode_service.worker import DecodeConfig, DecodeWorker
from pdserve.grpc_runtime import serve_until_signalled, start_server
from pdserve.worker_runtime import build_engine
from protos.pdserve.v1 import worker_pb2, worker_pb2_grpc

log = structlog.get_logger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Decode"].full_name


async def serve(config: DecodeConfig, grace_s: float = 5.0) -> None:
    engine = build_engine(config.engine)
    worker = DecodeWorker(config, engine)
    servicer = DecodeServicer(worker, config.engine.model.model)
    handle = await start_server(
        config.listen,
        [SERVICE_NAME],
        [functools.partial(worker_pb2_grpc.add_DecodeServicer_to_server, servicer)],
    )
    worker.start()
    log.info(
        "decode_worker_ready",
        listen=config.listen,
        port=handle.port,
        kv_endpoint=worker.kv_endpoint,
        blocks=config.engine.cache.num_blocks,
    )
    try:
        await serve_until_signalled(handle, [SERVICE_NAME], grace_s)
    finally:
        worker.stop()
