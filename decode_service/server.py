"""Entry point of a decode worker (``pdserve decode``)."""

from __future__ import annotations

from decode_service.servicer import TIER, DecodeServicer
from decode_service.worker import DecodeConfig, DecodeWorker
from server_runtime.grpc_runtime import Lifecycle
from server_runtime.metrics import WorkerMetrics
from server_runtime.worker_runtime import ServeOptions, build_engine, serve_tier


async def serve(
    config: DecodeConfig,
    metrics_port: int = 9102,
    grace_s: float = 5.0,
    options: ServeOptions | None = None,
) -> None:
    """Serve until SIGTERM; then drain: work in flight has ``grace_s`` to finish."""
    worker = DecodeWorker(config, build_engine(config.engine))

    def servicer(metrics: WorkerMetrics, lifecycle: Lifecycle) -> DecodeServicer:
        return DecodeServicer(worker, config.engine.model.model, metrics, lifecycle)

    await serve_tier(
        TIER,
        config.listen,
        worker,
        lambda: [worker.receiver.stats],
        servicer,
        metrics_port=metrics_port,
        grace_s=grace_s,
        options=options,
        kv_endpoint=lambda: worker.kv_endpoint,
        blocks=config.engine.cache.num_blocks,
    )
