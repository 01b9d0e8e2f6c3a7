"""When each request is sent, and the asyncio runner that sends them.

Open loop, as ``vllm bench serve`` does: gaps between requests are gamma-distributed with shape
``burstiness`` and mean ``1 / rate`` (burstiness 1 is a Poisson process; below 1 burstier,
above 1 more regular), accumulated into send times, then scaled so the last request is sent at
exactly ``N / rate`` seconds (without the scaling, the sum of N random gaps misses N / rate by a
few percent and throughput moves with the seed). ``rate = inf`` sends everything at once.

Closed loop: ``max_concurrency`` caps the requests in flight; a request due while the cap is
reached waits for a slot, and its clock (TTFT, E2E) starts when it is actually sent.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm  # type: ignore[import-untyped]

from pdserve.bench.datasets import BenchRequest
from pdserve.bench.metrics import RequestOutcome

# Sends one request; ``start_s`` is the run's clock origin (a ``time.perf_counter()`` value).
SendFn = Callable[[BenchRequest, float], Awaitable[RequestOutcome]]


@dataclass(frozen=True)
class LoadSpec:
    """How requests arrive: a rate (``inf``: all at once), its burstiness, and an optional
    concurrency cap (closed loop)."""

    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError("request rate must be positive (inf: all at once)")
        if not self.burstiness > 0:
            raise ValueError("burstiness must be positive")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max concurrency must be at least 1")

    def describe(self) -> str:
        rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}/s"
        text = f"rate {rate}"
        if not math.isinf(self.request_rate) and self.burstiness != 1.0:
            text += f" (burstiness {self.burstiness:g})"
        if self.max_concurrency is not None:
            text += f", max concurrency {self.max_concurrency}"
        return text


def send_times(num_requests: int, spec: LoadSpec) -> list[float]:
    """Seconds after the start at which each request is due (non-decreasing)."""
    if num_requests <= 0:
        return []
    if math.isinf(spec.request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(spec.seed)
    if math.isinf(spec.burstiness):
        gaps = np.full(num_requests, 1.0 / spec.request_rate)
    else:
        theta = 1.0 / (spec.request_rate * spec.burstiness)
        gaps = rng.gamma(shape=spec.burstiness, scale=theta, size=num_requests)
    times = np.cumsum(gaps)
    times *= (num_requests / spec.request_rate) / times[-1]
    return [float(t) for t in times]


@dataclass(frozen=True)
class RunTiming:
    """Outcomes in request order, and the run's duration (first send to last response)."""

    outcomes: list[RequestOutcome]
    duration_s: float


def progress_bar(total: int, desc: str, disable: bool = False) -> tqdm:
    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, disable=disable)


async def run_load(
    requests: Sequence[BenchRequest],
    spec: LoadSpec,
    send: SendFn,
    *,
    desc: str = "requests",
    disable_progress: bool = False,
) -> RunTiming:
    """Send ``requests`` on ``spec``'s schedule and wait for every one to finish."""
    due = send_times(len(requests), spec)
    limit = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
    bar = progress_bar(len(requests), desc, disable_progress)

    async def one(request: BenchRequest, origin: float) -> RequestOutcome:
        if limit is None:
            outcome = await send(request, origin)
        else:
            async with limit:
                outcome = await send(request, origin)
        bar.update(1)
        return outcome

    tasks: list[asyncio.Task[RequestOutcome]] = []
    start = time.perf_counter()
    try:
        for request, at in zip(requests, due, strict=True):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(request, start)))
        outcomes = await asyncio.gather(*tasks)
        end = time.perf_counter()
    finally:
        for task in tasks:
            task.cancel()
        bar.close()
    return RunTiming(list(outcomes), end - start)
