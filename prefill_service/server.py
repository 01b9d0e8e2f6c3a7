"""Entry point of a prefill worker (``pdserve prefill``)."""

from __future__ import annotations

import functools

from pdserve.worker_runtime import ServeOptions, build_engine, serve_worker, worker_metrics
from prefill_service.servicer import STATUS_CODES, WORK_METHODS, PrefillServicer
from prefill_service.worker import PrefillConfig, PrefillWorker
from protos.pdserve.v1 import worker_pb2, worker_pb2_grpc

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name


async def serve(
    config: PrefillConfig,
    metrics_port: int = 9101,
    grace_s: float = 5.0,
    options: ServeOptions | None = None,
) -> None:
    """Serve until SIGTERM; then drain: work in flight has ``grace_s`` to finish."""
    options = options or ServeOptions()
    worker = PrefillWorker(config, build_engine(config.engine))
    registry, worker.metrics = worker_metrics(
        "prefill", worker.engine, lambda: [worker.sender.stats]
    )
    lifecycle = options.lifecycle(config.engine.scheduler.max_num_seqs)
    servicer = PrefillServicer(worker, config.engine.model.model, lifecycle)
    add = functools.partial(worker_pb2_grpc.add_PrefillServicer_to_server, servicer)
    await serve_worker(
        "prefill",
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
        backend=config.transfer.backend.value,
        streaming=config.transfer.streaming.value,
    )
