"""Start-up shared by the prefill and decode entry points: :func:`serve_tier` builds a worker's
metrics and admission lifecycle, makes its servicer, and serves it until SIGTERM; the tiers
hand in only what differs (:class:`Tier`, the worker, its transfer stats, its servicer)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
import structlog
import torch
from prometheus_client import CollectorRegistry

from core.tls import TLSConfig
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.model_loader import load_model
from kvtransfer.metrics import TransferStats
from server_runtime.engine_watchdog import start_engine_watchdog
from server_runtime.gpu import register_gpu_metrics
from server_runtime.grpc_runtime import (
    BASE_STATUS_CODES,
    Lifecycle,
    serve_until_signalled,
    start_server,
)
from server_runtime.interceptors import CallScope
from server_runtime.metrics import WorkerMetrics, serve_metrics
from server_runtime.settings import KeepAlive

log = structlog.get_logger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class ServeOptions:
    """How a worker's gRPC server runs (the same for both tiers)."""

    tls: TLSConfig | None = None
    """Server TLS; with ``require_client_cert`` only holders of a CA-signed certificate (the
    gateway) may call (mTLS between tiers)."""
    max_queue: int = 256
    """Work calls beyond the batch size (``max_num_seqs``) that may wait; past that a call is
    refused with RESOURCE_EXHAUSTED and a retry hint (0: no bound)."""

    keepalive: KeepAlive = field(default_factory=KeepAlive)
    """Pings to the gateways, so a hung one cannot hold this worker's calls and KV."""

    def lifecycle(self, max_num_seqs: int) -> Lifecycle:
        return Lifecycle(max_in_flight=max_num_seqs + self.max_queue if self.max_queue else 0)


async def load_updates(
    snapshot: Callable[[], T], interval_ms: int, stopped: asyncio.Event | None = None
) -> AsyncIterator[T]:
    """``snapshot()`` now and then every ``interval_ms`` (clamped to [50, 5000]; 0: 250), until
    ``stopped`` is set (the server is about to stop)."""
    interval = min(max(interval_ms or 250, 50), 5000) / 1000
    while stopped is None or not stopped.is_set():
        yield snapshot()
        if stopped is None:
            await asyncio.sleep(interval)
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopped.wait(), interval)


class Worker(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


class EngineWorker(Worker, Protocol):
    engine: AsyncEngine


@dataclass(frozen=True)
class Tier:
    """What differs between the two worker entry points, besides the worker itself."""

    name: str
    """``prefill`` or ``decode``: the ``tier`` of metrics and log lines."""
    service_name: str
    add_servicer: Callable[[Any, grpc.aio.Server], None]
    """The generated ``add_<Service>Servicer_to_server``."""
    work_methods: tuple[str, ...]
    """Methods admitted through the server's bounded lifecycle (the work calls)."""
    status_codes: dict[type[Exception], grpc.StatusCode]
    """Domain exceptions to gRPC status codes, for the server's call scope."""


def build_engine(config: EngineConfig) -> AsyncEngine:
    """Load the model and wrap it in an engine (call inside the worker's event loop)."""
    if config.cpus:
        os.sched_setaffinity(0, config.cpus)
        log.info("cpu_affinity", cpus=sorted(os.sched_getaffinity(0)))
    # Only the engine thread computes in parallel (it sets its own thread count): an OpenMP
    # team on this thread too would leave more OpenMP threads than cores, and libgomp then stops
    # spinning between parallel regions (a decode step measured 104 instead of 80 ms).
    torch.set_num_threads(1)
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
    *,
    lifecycle: Lifecycle | None = None,
    tls: TLSConfig | None = None,
    keepalive: KeepAlive | None = None,
    work_methods: Iterable[str] = (),
    status_codes: dict[type[Exception], grpc.StatusCode] | None = None,
    engine: AsyncEngine | None = None,
    **ready_fields: object,
) -> None:
    """Serve one worker's gRPC service (and its metrics port) until SIGTERM/SIGINT; the worker
    runs meanwhile. On SIGTERM the server drains (see :mod:`server_runtime.grpc_runtime`) before the
    worker stops. ``ready_fields`` go on the ready log line (callables are read once the
    worker started). ``engine`` is watched for stalls (:mod:`server_runtime.engine_watchdog`)."""
    lifecycle = lifecycle or Lifecycle()
    scope = CallScope(lifecycle, work_methods, status_codes or BASE_STATUS_CODES)
    handle = await start_server(
        listen,
        [service_name],
        [add_servicer],
        tls=tls,
        lifecycle=lifecycle,
        interceptors=[scope],
        keepalive=keepalive,
    )
    serve_metrics(metrics[1], metrics[0])
    worker.start()
    watchdog = None if engine is None else start_engine_watchdog(engine, handle, [service_name])
    fields = {k: v() if callable(v) else v for k, v in ready_fields.items()}
    log.info(f"{tier}_worker_ready", listen=listen, port=handle.port, tls=tls is not None, **fields)
    try:
        await serve_until_signalled(handle, [service_name], grace_s)
    finally:
        if watchdog is not None:
            watchdog.stop()
        worker.stop()


async def serve_tier(
    tier: Tier,
    listen: str,
    worker: EngineWorker,
    transfers: Callable[[], list[TransferStats]],
    make_servicer: Callable[[WorkerMetrics, Lifecycle], object],
    *,
    metrics_port: int,
    grace_s: float,
    options: ServeOptions | None = None,
    **ready_fields: object,
) -> None:
    """Serve ``worker`` as ``tier`` until SIGTERM (then drain, see :func:`serve_worker`):
    its metrics registry (``transfers`` read at scrape time) on ``metrics_port``, an admission
    lifecycle sized by its batch and ``options.max_queue``, and the servicer ``make_servicer``
    builds from both."""
    options = options or ServeOptions()
    registry, metrics = worker_metrics(tier.name, worker.engine, transfers)
    lifecycle = options.lifecycle(worker.engine.max_num_seqs)
    servicer = make_servicer(metrics, lifecycle)
    await serve_worker(
        tier.name,
        listen,
        tier.service_name,
        worker,
        functools.partial(tier.add_servicer, servicer),
        grace_s,
        (registry, metrics_port),
        lifecycle=lifecycle,
        tls=options.tls,
        keepalive=options.keepalive,
        work_methods=tier.work_methods,
        status_codes=tier.status_codes,
        engine=worker.engine,
        **ready_fields,
    )
