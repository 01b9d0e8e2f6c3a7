"""Serving metrics exactly as ``vllm bench serve`` defines them, from client-side timestamps.

Per request (:class:`RequestOutcome`): TTFT, TPOT, ITL and E2E latency; over the run
(:func:`compute_metrics`): request and token throughput, goodput against SLOs, completion rate.
Statistics use ``numpy`` (mean, median, population std, linear-interpolation percentiles), and
an empty set counts as 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

DEFAULT_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0)


class SloMetric(Enum):
    """Per-request metrics an SLO can bound (vLLM's ``--goodput`` keys)."""

    TTFT = "ttft"
    TPOT = "tpot"
    E2EL = "e2el"


@dataclass(frozen=True)
class RequestOutcome:
    """What the client saw for one request; times in seconds (``start_s`` on the run's clock).

    - ``ttft_s``: first streamed message with tokens received - request sent;
    - ``latency_s`` (E2E): last message with tokens received - request sent;
    - ``tpot_s``: (E2E - TTFT) / (output tokens - 1);
    - ``itl_s``: every gap between consecutive messages with tokens (a message carrying several
      tokens is one gap, as in vLLM); pooled over all requests in the run's ITL.
    """

    success: bool
    prompt_len: int
    output_tokens: int = 0
    ttft_s: float = 0.0
    itl_s: tuple[float, ...] = ()
    latency_s: float = 0.0
    start_s: float = 0.0
    error: str = ""

    @property
    def tpot_s(self) -> float:
        """vLLM's TPOT; 0 when there is at most one output token."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class LatencyStats:
    """Summary of one latency metric, in milliseconds."""

    mean_ms: float
    median_ms: float
    std_ms: float
    percentiles_ms: Mapping[float, float]

    @classmethod
    def of(cls, values_s: Sequence[float], percentiles: Sequence[float]) -> LatencyStats:
        data: Sequence[float] | float = values_s if len(values_s) else 0.0
        return cls(
            mean_ms=float(np.mean(data)) * 1000,
            median_ms=float(np.median(data)) * 1000,
            std_ms=float(np.std(data)) * 1000,
            percentiles_ms={p: float(np.percentile(data, p)) * 1000 for p in percentiles},
        )


def percentile_key(p: float) -> str:
    """``p99``, ``p99.9``: vLLM's spelling of a percentile in result keys."""
    return f"p{p:g}"


@dataclass(frozen=True)
class BenchMetrics:
    """Every metric of one run; ``as_dict`` uses vLLM's result-file names."""

    num_requests: int
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    request_goodput: float | None
    """Requests meeting every SLO per second; None when no SLO was given."""
    good_requests: int | None
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2el: LatencyStats
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    slos_ms: Mapping[str, float] = field(default_factory=dict)

    @property
    def completion_rate(self) -> float:
        return self.completed / self.num_requests if self.num_requests else 0.0

    @property
    def slo_attainment(self) -> float | None:
        """Share of all requests that completed within every SLO (DistServe's attainment)."""
        if self.good_requests is None or not self.num_requests:
            return None
        return self.good_requests / self.num_requests

    def as_dict(self) -> dict[str, float | int | dict[str, float] | None]:
        out: dict[str, float | int | dict[str, float] | None] = {
            "num_requests": self.num_requests,
            "completed": self.completed,
            "failed": self.failed,
            "completion_rate": self.completion_rate,
            "duration": self.duration_s,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "request_throughput": self.request_throughput,
            "request_goodput": self.request_goodput,
            "good_requests": self.good_requests,
            "slo_attainment": self.slo_attainment,
            "goodput_slos_ms": dict(self.slos_ms),
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "max_output_tokens_per_s": self.max_output_tokens_per_s,
            "max_concurrent_requests": self.max_concurrent_requests,
        }
        for name in ("ttft", "tpot", "itl", "e2el"):
            stats: LatencyStats = getattr(self, name)
            out[f"mean_{name}_ms"] = stats.mean_ms
            out[f"median_{name}_ms"] = stats.median_ms
            out[f"std_{name}_ms"] = stats.std_ms
            for p, value in stats.percentiles_ms.items():
                out[f"{percentile_key(p)}_{name}_ms"] = value
        return out


def parse_goodput(pairs: Sequence[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:100"]`` -> ``{"ttft": 500.0, "tpot": 100.0}`` (milliseconds)."""
    slos: dict[str, float] = {}
    valid = ", ".join(m.value for m in SloMetric)
    for pair in pairs:
        name, sep, value = pair.partition(":")
        if not sep:
            raise ValueError(f"bad goodput SLO {pair!r}: want KEY:MILLISECONDS")
        if name not in {m.value for m in SloMetric}:
            raise ValueError(f"bad goodput SLO {pair!r}: key must be one of {valid}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"bad goodput SLO {pair!r}: {value!r} is not a number") from None
        if ms < 0:
            raise ValueError(f"bad goodput SLO {pair!r}: must be >= 0")
        slos[name] = ms
    return slos


def _meets(outcome: RequestOutcome, slos_ms: Mapping[str, float]) -> bool:
    measured = {
        SloMetric.TTFT.value: outcome.ttft_s,
        SloMetric.TPOT.value: outcome.tpot_s,
        SloMetric.E2EL.value: outcome.latency_s,
    }
    return all(measured[name] <= ms / 1000 for name, ms in slos_ms.items())


def _peaks(done: Sequence[RequestOutcome]) -> tuple[float, int]:
    """vLLM's peak output tokens in any one-second bucket, and peak concurrent requests."""
    if not done:
        return 0.0, 0
    t0 = min(o.start_s for o in done)
    t1 = max(o.start_s + o.latency_s for o in done)
    buckets = np.zeros(int(np.ceil(t1 - t0)) + 1)
    for o in done:
        t = o.start_s + o.ttft_s
        token_times = [t]
        for gap in o.itl_s:
            t += gap
            token_times.append(t)
        for when in token_times:
            bucket = int(when - t0)
            if 0 <= bucket < len(buckets):
                buckets[bucket] += 1
    events = sorted(
        [(o.start_s, 1) for o in done] + [(o.start_s + o.latency_s, -1) for o in done]
    )  # departures (-1) sort before arrivals at the same instant: half-open intervals
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return float(buckets.max()), peak


def compute_metrics(
    outcomes: Sequence[RequestOutcome],
    duration_s: float,
    slos_ms: Mapping[str, float] | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> BenchMetrics:
    """All metrics of a run from its per-request outcomes and its wall-clock duration
    (``duration_s``: first request sent to last response received).

    Goodput is requests meeting every SLO / duration, where a request with one output token
    counts TPOT as 0; TPOT statistics cover only requests with more than one output token.
    """
    if duration_s <= 0:
        raise ValueError("duration must be positive")
    done = [o for o in outcomes if o.success]
    total_in = sum(o.prompt_len for o in done)
    total_out = sum(o.output_tokens for o in done)
    good = sum(_meets(o, slos_ms) for o in done) if slos_ms else None
    peak_tokens, peak_concurrency = _peaks(done)
    return BenchMetrics(
        num_requests=len(outcomes),
        completed=len(done),
        failed=len(outcomes) - len(done),
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(done) / duration_s,
        output_throughput=total_out / duration_s,
        total_token_throughput=(total_in + total_out) / duration_s,
        request_goodput=None if good is None else good / duration_s,
        good_requests=good,
        ttft=LatencyStats.of([o.ttft_s for o in done], percentiles),
        tpot=LatencyStats.of([o.tpot_s for o in done if o.output_tokens > 1], percentiles),
        itl=LatencyStats.of([gap for o in done for gap in o.itl_s], percentiles),
        e2el=LatencyStats.of([o.latency_s for o in done], percentiles),
        max_output_tokens_per_s=peak_tokens,
        max_concurrent_requests=peak_concurrency,
        slos_ms=dict(slos_ms or {}),
    )
