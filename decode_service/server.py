"""Entry point of a decode worker (``pdserve decode``)."""

from __future__ import annotations

import functools

from decode_service.servicer import STATUS_CODES, WORK_METHODS, DecodeServicer
from decode_service.worker import DecodeConfig, DecodeWorker
from pdserve.worker_runtime import ServeOptions, build_engine, serve_worker, worker_metrics
from protos.pdserve.v1 import worker_pb2, worker_pb2_grpc

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Decode"].full_name


async def serve(
    config: DecodeConfig,
    metrics_port: int = 9102,
    grace_s: float = 5.0,
    options: ServeOptions | None = None,
) -> None:
    """Serve until SIGTERM; then drain: work in flight has ``grace_s`` to finish."""
    options = options or ServeOptions()
    worker = DecodeWorker(config, build_engine(config.engine))
    registry, metrics = worker_metrics("decode", worker.engine, lambda: [worker.receiver.stats])
    lifecycle = options.lifecycle(config.engine.scheduler.max_num_seqs)
    servicer = DecodeServicer(worker, config.engine.model.model, metrics, lifecycle)
    add = functools.partial(worker_pb2_grpc.add_DecodeServicer_to_server, servicer)
    await serve_worker(
        "decode",
        config.listen,
        SERVICE_NAME,
        worker,
        add,
        grace_s,
        (registry, metrics_port),
        lifecycle=lifecycle,
        tls=options.tls,
        work_methods=WORK_METHODS,
        status_codes=STATUS_CODES,
        kv_endpoint=lambda: worker.kv_endpoint,
        blocks=config.engine.cache.num_blocks,
    )
