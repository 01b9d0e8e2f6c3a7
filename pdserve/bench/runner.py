"""Benchmark one gateway at one load: warm up, send the schedule, compute the metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.bench.datasets import BenchRequest
from pdserve.bench.load import LoadSpec, run_load
from pdserve.bench.metrics import DEFAULT_PERCENTILES, RequestOutcome, compute_metrics
from pdserve.bench.report import RunResult
from pdserve.bench.stream import send_to_gateway
from pdserve.client import AsyncClient

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


def warmup_request(requests: Sequence[BenchRequest]) -> BenchRequest:
    """A short request shaped like the first one but with its prompt reversed, so it does not
    warm a prefix cache for the measured requests."""
    first = requests[0]
    return BenchRequest(first.prompt_token_ids[::-1], min(WARMUP_OUTPUT_TOKENS, first.output_len))


async def _bench(
    address: str, requests: Sequence[BenchRequest], load: LoadSpec, settings: RunSettings, desc: str
) -> tuple[list[RequestOutcome], float]:
    async with AsyncClient(address) as client:

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
) -> RunResult:
    """Run ``requests`` against the gateway at ``address`` on ``load``'s schedule."""
    outcomes, duration = asyncio.run(_bench(address, requests, load, settings, label))
    metrics = compute_metrics(outcomes, duration, settings.slos_ms, settings.percentiles)
    return RunResult(label, description or f"gateway {address}", load, metrics, outcomes)
