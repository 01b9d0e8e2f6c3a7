"""Benchmark one gateway at one load: warm up, send the schedule, compute the metrics.

The requests go through the client SDK (:class:`pdserve.client.AsyncClient`) with the caller's
:class:`ClientOptions`: TLS, bearer token, and retries of calls refused with
RESOURCE_EXHAUSTED after the server's RetryInfo delay. A retried request's TTFT and latency
include its waits, as a client of the service would experience them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from core.tls import TLSConfig
from pdserve.bench.datasets import BenchRequest
from pdserve.bench.load import LoadSpec, run_load
from pdserve.bench.metrics import DEFAULT_PERCENTILES, RequestOutcome, compute_metrics
from pdserve.bench.report import RunResult
from pdserve.bench.stream import send_to_gateway
from pdserve.client import AsyncClient, RetryPolicy

WARMUP_OUTPUT_TOKENS = 4


@dataclass(frozen=True)
class RunSettings:
    """How every run is measured, whatever the system or load."""

    slos_ms: dict[str, float]
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    temperature: float = 0.0
    timeout_s: float | None = None
    num_warmups: int = 1
    disable_progress: bool = False


@dataclass(frozen=True)
class ClientOptions:
    """How the benchmark's client reaches the gateway (the SDK's own options)."""

    tls: TLSConfig | None = None
    """The gateway's CA (and a client certificate when it wants one); None: plaintext."""
    token: str | None = None
    """Sent as ``authorization: Bearer <token>``."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Retries of calls refused before their first message (RESOURCE_EXHAUSTED)."""


def warmup_request(requests: Sequence[BenchRequest]) -> BenchRequest:
    """A short request shaped like the first one but with its prompt reversed, so it does not
    warm a prefix cache for the measured requests."""
    first = requests[0]
    return BenchRequest(first.prompt_token_ids[::-1], min(WARMUP_OUTPUT_TOKENS, first.output_len))


async def bench_gateway_async(
    address: str,
    requests: Sequence[BenchRequest],
    load: LoadSpec,
    settings: RunSettings,
    client_options: ClientOptions | None = None,
    desc: str = "pdserve",
) -> tuple[list[RequestOutcome], float]:
    """Warm up, then send ``requests`` on ``load``'s schedule: (outcomes, duration in s)."""
    opts = client_options or ClientOptions()
    async with AsyncClient(address, tls=opts.tls, token=opts.token, retry=opts.retry) as client:

        async def send(request: BenchRequest, origin: float) -> RequestOutcome:
            return await send_to_gateway(
                client,
                request,
                origin,
                temperature=settings.temperature,
                timeout_s=settings.timeout_s,
            )

        for _ in range(settings.num_warmups):
            warm = await send(warmup_request(requests), 0.0)
            if not warm.success:
                raise RuntimeError(f"warm-up request to {address} failed: {warm.error}")
        timing = await run_load(
            requests, load, send, desc=desc, disable_progress=settings.disable_progress
        )
    return timing.outcomes, timing.duration_s


def bench_gateway(
    address: str,
    requests: Sequence[BenchRequest],
    load: LoadSpec,
    settings: RunSettings,
    *,
    label: str = "pdserve",
    description: str = "",
    client_options: ClientOptions | None = None,
) -> RunResult:
    """Run ``requests`` against the gateway at ``address`` on ``load``'s schedule."""
    outcomes, duration = asyncio.run(
        bench_gateway_async(address, requests, load, settings, client_options, label)
    )
    metrics = compute_metrics(outcomes, duration, settings.slos_ms, settings.percentiles)
    return RunResult(label, description or f"gateway {address}", load, metrics, outcomes)
