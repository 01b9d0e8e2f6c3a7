"""Arrival schedules (seeded, exact mean rate, gamma burstiness) and the closed-loop cap."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from pdserve.bench.datasets import BenchRequest
from pdserve.bench.load import LoadSpec, run_load, send_times
from pdserve.bench.metrics import RequestOutcome


def test_same_seed_same_schedule_other_seed_other_schedule() -> None:
    spec = LoadSpec(request_rate=4.0, seed=7)
    assert send_times(50, spec) == send_times(50, spec)
    assert send_times(50, spec) != send_times(50, LoadSpec(request_rate=4.0, seed=8))


def test_n_requests_take_n_over_rate_seconds() -> None:
    for rate, burstiness in ((0.5, 1.0), (4.0, 0.3), (100.0, 5.0)):
        times = send_times(40, LoadSpec(request_rate=rate, burstiness=burstiness, seed=1))
        assert times[-1] == pytest.approx(40 / rate)
        assert times == sorted(times)
        assert times[0] > 0  # the first gap is drawn too, as vLLM does


def test_infinite_rate_sends_everything_at_once() -> None:
    assert send_times(5, LoadSpec()) == [0.0] * 5
    assert send_times(0, LoadSpec(request_rate=1.0)) == []


def test_infinite_burstiness_is_a_constant_rate() -> None:
    times = send_times(4, LoadSpec(request_rate=2.0, burstiness=math.inf))
    assert times == pytest.approx([0.5, 1.0, 1.5, 2.0])


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gap_spread_follows_gamma_shape(burstiness: float) -> None:
    """Gamma gaps with shape k have coefficient of variation 1/sqrt(k): Poisson at k = 1."""
    times = np.array(send_times(20000, LoadSpec(10.0, burstiness, seed=3)))
    gaps = np.diff(np.concatenate([[0.0], times]))
    assert gaps.mean() == pytest.approx(0.1, rel=1e-9)  # rescaled to exactly 1 / rate
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_bad_specs_are_refused() -> None:
    for kwargs in ({"request_rate": 0.0}, {"burstiness": 0.0}, {"max_concurrency": 0}):
        with pytest.raises(ValueError):
            LoadSpec(**kwargs)


def test_closed_loop_never_exceeds_max_concurrency() -> None:
    in_flight = 0
    peak = 0

    async def send(request: BenchRequest, origin: float) -> RequestOutcome:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        return RequestOutcome(success=True, prompt_len=request.prompt_len, output_tokens=1)

    requests = [BenchRequest((1,) * (i + 1), 1) for i in range(12)]
    timing = asyncio.run(
        run_load(requests, LoadSpec(max_concurrency=3), send, disable_progress=True)
    )
    assert peak == 3
    assert [o.prompt_len for o in timing.outcomes] == list(range(1, 13))  # request order
    assert timing.duration_s > 0
