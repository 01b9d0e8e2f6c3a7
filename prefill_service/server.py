"""Entry point of a prefill worker (``pdserve prefill``)."""

from __future__ import annotations

import functools

from pdserve.worker_runtime import build_engine, serve_worker, worker_metrics
from prefill_service.servicer import PrefillServicer
from prefill_service.worker import PrefillConfig, PrefillWorker
from protos.pdserve.v1 import worker_pb2, worker_pb2_grpc

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name


async def serve(config: PrefillConfig, metrics_port: int = 9101, grace_s: float = 5.0) -> None:
    worker = PrefillWorker(config, build_engine(config.engine))
    registry, worker.metrics = worker_metrics(
        "prefill", worker.engine, lambda: [worker.sender.stats]
    )
    servicer = PrefillServicer(worker, config.engine.model.model)
    add = functools.partial(worker_pb2_grpc.add_PrefillServicer_to_server, servicer)
    await serve_worker(
        "prefill",
        config.listen,
        SERVICE_NAME,
        worker,
        add,
        grace_s,
        (registry, metrics_port),
        backend=config.transfer.backend.value,
        streaming=config.transfer.streaming.value,
    )
