"""Start-up shared by the prefill and decode entry points."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import grpc
import structlog
import torch
from prometheus_client import CollectorRegistry

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.model_loader import load_model
from kvtransfer.metrics import TransferStats
from pdserve.gpu import register_gpu_metrics
from pdserve.grpc_runtime import serve_until_signalled, start_server
from pdserve.metrics import WorkerMetrics, serve_metrics

log = structlog.get_logger(__name__)


class Worker(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


def build_engine(config: EngineConfig) -> AsyncEngine:
    """Load the model and wrap it in an engine (call inside the worker's event loop)."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    model, spec = load_model(config.model)
    return AsyncEngine(config, model, spec)


def worker_metrics(
    tier: str,
    engine: AsyncEngine,
    transfers: Callable[[], list[TransferStats]],
) -> tuple[CollectorRegistry, WorkerMetrics]:
    """This worker's registry: request histograms, pool and transfer state, GPU telemetry."""
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, tier, engine.stats, transfers)
    register_gpu_metrics(registry, tier)
    return registry, metrics


async def serve_worker(
    tier: str,
    listen: str,
    service_name: str,
    worker: Worker,
    add_servicer: Callable[[grpc.aio.Server], Any],
    grace_s: float,
    metrics: tuple[CollectorRegistry, int],
    **ready_fields: object,
) -> None:
    """Serve one worker's gRPC service (and its metrics port) until SIGTERM/SIGINT; the worker
    runs meanwhile. ``ready_fields`` go on the ready log line (callables are read once the
    worker started)."""
    handle = await start_server(listen, [service_name], [add_servicer])
    serve_metrics(metrics[1], metrics[0])
    worker.start()
    fields = {k: v() if callable(v) else v for k, v in ready_fields.items()}
    log.info(f"{tier}_worker_ready", listen=listen, port=handle.port, **fields)
    try:
        await serve_until_signalled(handle, [service_name], grace_s)
    finally:
        worker.stop()
