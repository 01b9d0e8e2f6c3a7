"""Entry point of a prefill worker (``pdserve prefill``)."""

from __future__ import annotations

from prefill_service.servicer import TIER, PrefillServicer
from prefill_service.worker import PrefillConfig, PrefillWorker
from server_runtime.grpc_runtime import Lifecycle
from server_runtime.metrics import WorkerMetrics
from server_runtime.worker_runtime import ServeOptions, build_engine, serve_tier


async def serve(
    config: PrefillConfig,
    metrics_port: int = 9101,
    grace_s: float = 5.0,
    options: ServeOptions | None = None,
) -> None:
    """Serve until SIGTERM; then drain: work in flight has ``grace_s`` to finish."""
    worker = PrefillWorker(config, build_engine(config.engine))

    def servicer(metrics: WorkerMetrics, lifecycle: Lifecycle) -> PrefillServicer:
        worker.metrics = metrics  # the worker observes its requests' times itself
        return PrefillServicer(worker, config.engine.model.model, lifecycle)

    await serve_tier(
        TIER,
        config.listen,
        worker,
        lambda: [worker.sender.stats],
        servicer,
        metrics_port=metrics_port,
        grace_s=grace_s,
        options=options,
        backend=config.transfer.backend.value,
        streaming=config.transfer.streaming.value,
    )
