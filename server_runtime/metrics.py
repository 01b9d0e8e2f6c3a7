"""Prometheus metrics of every pdserve process, named and shaped as vLLM's (prefix ``pdserve_``,
base units, a ``tier`` label), on an HTTP port of its own (``--metrics-port``).

Each process builds one :class:`prometheus_client.CollectorRegistry` at its entry point and passes
it down; nothing registers at import time. Request-level histograms are observed where the event
happens (the gateway for what the client sees: TTFT, ITL, E2E; workers for queue, prefill and
decode time); pool and transfer state is read at scrape time by collectors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from core.pool_stats import PoolStats
from core.sampling import RequestTimings
from kvtransfer.metrics import DURATION_BUCKETS, TransferStats

log = structlog.get_logger(__name__)

# Buckets include the SLO thresholds people set (TTFT 200/500 ms, 1-2 s; ITL 50/100 ms).
TTFT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


def serve_metrics(port: int, registry: CollectorRegistry, host: str = "0.0.0.0") -> None:
    """Expose ``registry`` at ``http://host:port/metrics`` (0 disables)."""
    if port:
        start_http_server(port, addr=host, registry=registry)
        log.info("metrics_listening", port=port)


def _histogram(
    registry: CollectorRegistry, tier: str, name: str, doc: str, buckets: tuple[float, ...]
) -> Histogram:
    """A histogram labelled ``tier``, as the child for this process's tier."""
    return Histogram(name, doc, ["tier"], buckets=buckets, registry=registry).labels(tier)


def _counter(registry: CollectorRegistry, tier: str, name: str, doc: str) -> Counter:
    """A counter labelled ``tier``, as the child for this process's tier."""
    return Counter(name, doc, ["tier"], registry=registry).labels(tier)


class _TierCounter:
    """A counter with labels beyond ``tier``; this process's tier is filled in."""

    def __init__(
        self, registry: CollectorRegistry, tier: str, name: str, doc: str, *labels: str
    ) -> None:
        self._counter = Counter(name, doc, ["tier", *labels], registry=registry)
        self._tier = tier

    def inc(self, *values: str) -> None:
        self._counter.labels(self._tier, *values).inc()


class GatewayMetrics:
    """What clients observe, measured at the gateway."""

    def __init__(self, registry: CollectorRegistry) -> None:
        g = "gateway"
        self.ttft = _histogram(
            registry,
            g,
            "pdserve_time_to_first_token_seconds",
            "Time from request arrival to the first token sent.",
            TTFT_BUCKETS,
        )
        self.itl = _histogram(
            registry,
            g,
            "pdserve_inter_token_latency_seconds",
            "Gap between consecutive token messages, per token.",
            ITL_BUCKETS,
        )
        self.e2e = _histogram(
            registry,
            g,
            "pdserve_e2e_request_latency_seconds",
            "Time from request arrival to its last message.",
            REQUEST_BUCKETS,
        )
        self.prompt_tokens = _counter(
            registry, g, "pdserve_prompt_tokens", "Prompt tokens of accepted requests."
        )
        self.generation_tokens = _counter(
            registry, g, "pdserve_generation_tokens", "Tokens streamed back."
        )
        self._requests = _TierCounter(
            registry, g, "pdserve_requests", "Finished requests by gRPC status code.", "code"
        )
        self._decisions = _TierCounter(
            registry,
            g,
            "pdserve_router_decisions",
            "Routing decisions (disaggregated or colocated).",
            "decision",
        )
        self._prefill_picks = _TierCounter(
            registry,
            g,
            "pdserve_router_prefill_picks",
            "Prefill workers chosen, by reason (worker_prefix_cache, recent_route, ...).",
            "reason",
        )
        self._fallbacks = _TierCounter(
            registry,
            g,
            "pdserve_router_fallbacks",
            "Routes that could not take the first choice, by reason.",
            "reason",
        )
        self._retries = _TierCounter(
            registry,
            g,
            "pdserve_prefill_retries",
            "Attempts retried on another route before the first token, by the failed tier "
            "and its status code.",
            "failed_tier",
            "reason",
        )
        self._resumes = _TierCounter(
            registry,
            g,
            "pdserve_decode_resumes",
            "Streams broken after their first token: resumed elsewhere, or failed (UNAVAILABLE).",
            "outcome",
        )
        self._migrations = _TierCounter(
            registry,
            g,
            "pdserve_migrations",
            "Streams a draining decode worker offered: moved with their KV (migrated), left "
            "to finish there (kept: no other worker), or resumed by re-prefill (failed).",
            "outcome",
        )
        self.migration_bytes = _counter(
            registry, g, "pdserve_migration_bytes", "KV bytes moved by stream migrations."
        )
        self.migration_pause = _histogram(
            registry,
            g,
            "pdserve_migration_pause_seconds",
            "A migrated stream's gap: from the offer to the target's first token.",
            ITL_BUCKETS,
        )
        self._http = _TierCounter(
            registry,
            g,
            "pdserve_http_requests",
            "OpenAI-compatible HTTP API requests, by route and HTTP status.",
            "route",
            "status",
        )

    def http_request(self, route: str, status: int) -> None:
        self._http.inc(route, str(status))

    def request_done(self, code: str) -> None:
        self._requests.inc(code)

    def routed(
        self, decision: str, prefill_reason: str = "", fallbacks: Iterable[str] = ()
    ) -> None:
        self._decisions.inc(decision)
        if prefill_reason:
            self._prefill_picks.inc(prefill_reason)
        for reason in fallbacks:
            self._fallbacks.inc(reason)

    def prefill_retry(self, failed_tier: str, code: str) -> None:
        """An attempt failed before the first token and is retried on another route."""
        self._retries.inc(failed_tier or "gateway", code.lower())

    def decode_resume(self, outcome: str) -> None:
        """``resumed``: a broken stream continued on another route; ``failed``: it could not."""
        self._resumes.inc(outcome)

    def migration(self, outcome: str) -> None:
        """A draining worker's stream: ``migrated``, ``kept`` or ``failed``."""
        self._migrations.inc(outcome)


class WorkerMetrics:
    """Per-request times on a worker, plus its pool and transfer state read at scrape time."""

    def __init__(
        self,
        registry: CollectorRegistry,
        tier: str,
        pool: Callable[[], PoolStats],
        transfers: Callable[[], list[TransferStats]],
    ) -> None:
        self.queue_time = _histogram(
            registry,
            tier,
            "pdserve_request_queue_time_seconds",
            "Arrival to first scheduled, on this worker.",
            REQUEST_BUCKETS,
        )
        self.prefill_time = _histogram(
            registry,
            tier,
            "pdserve_request_prefill_time_seconds",
            "First scheduled to first token, on this worker.",
            REQUEST_BUCKETS,
        )
        self.decode_time = _histogram(
            registry,
            tier,
            "pdserve_request_decode_time_seconds",
            "First token to finish, on this worker.",
            REQUEST_BUCKETS,
        )
        self.prompt_tokens = _counter(
            registry, tier, "pdserve_prompt_tokens", "Prompt tokens computed here."
        )
        self.generation_tokens = _counter(
            registry, tier, "pdserve_generation_tokens", "Tokens sampled here."
        )
        registry.register(_StateCollector(tier, pool, transfers))

    def observe(self, timings: RequestTimings, prompt_tokens: int, generated: int) -> None:
        self.queue_time.observe(timings.queue_s)
        self.prefill_time.observe(timings.prefill_s)
        self.decode_time.observe(timings.decode_s)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated)


class _StateCollector(Collector):
    """Pool gauges and transfer counters, read from the engine and transfer stats per scrape."""

    def __init__(
        self,
        tier: str,
        pool: Callable[[], PoolStats],
        transfers: Callable[[], list[TransferStats]],
    ) -> None:
        self._tier = tier
        self._pool = pool
        self._transfers = transfers

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        tier = self._tier
        stats = self._pool()
        yield _gauge("pdserve_num_requests_running", "Sequences in the batch.", tier, stats.running)
        yield _gauge(
            "pdserve_num_requests_waiting",
            "Sequences queued for compute or KV.",
            tier,
            stats.waiting + stats.awaiting_kv,
        )
        yield _gauge(
            "pdserve_kv_cache_usage_ratio", "Fraction of KV blocks in use.", tier, stats.usage
        )
        yield _gauge("pdserve_kv_cache_blocks", "KV blocks in the pool.", tier, stats.total_blocks)
        for name, doc, value in (
            ("pdserve_num_preemptions", "Sequences preempted.", stats.num_preemptions),
            (
                "pdserve_prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                stats.prefix_query_tokens,
            ),
            (
                "pdserve_prefix_cache_hits",
                "Prompt tokens found in the prefix cache.",
                stats.prefix_hit_tokens,
            ),
            (
                "pdserve_spec_proposed_tokens",
                "Speculative draft tokens verified.",
                stats.spec.proposed,
            ),
            (
                "pdserve_spec_accepted_tokens",
                "Speculative draft tokens kept (acceptance rate: accepted / proposed).",
                stats.spec.accepted,
            ),
            (
                "pdserve_spec_verify_steps",
                "Sequence-steps that verified a draft (tokens per such step: "
                "(accepted + steps) / steps).",
                stats.spec.verify_steps,
            ),
        ):
            counter = CounterMetricFamily(name, doc, labels=["tier"])
            counter.add_metric([tier], value)
            yield counter
        yield from _transfer_families(tier, self._transfers())


def _gauge(name: str, doc: str, tier: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["tier"])
    family.add_metric([tier], value)
    return family


def _transfer_families(
    tier: str, all_stats: list[TransferStats]
) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
    labels = ["tier", "backend"]
    byte_count = CounterMetricFamily(
        "pdserve_kv_transfer_bytes", "KV page bytes moved.", labels=labels
    )
    transfers = CounterMetricFamily(
        "pdserve_kv_transfers", "KV transfers completed.", labels=labels
    )
    failures = CounterMetricFamily(
        "pdserve_kv_transfer_failures", "KV transfers failed.", labels=[*labels, "reason"]
    )
    dropped = CounterMetricFamily(
        "pdserve_kv_transfer_dropped_frames",
        "KV frames dropped (unauthenticated, malformed, late).",
        labels=[*labels, "reason"],
    )
    seconds = HistogramMetricFamily(
        "pdserve_kv_transfer_seconds", "First frame to completion, per transfer.", labels=labels
    )
    for stats in all_stats:
        key = [tier, stats.backend]
        byte_count.add_metric(key, stats.bytes)
        transfers.add_metric(key, stats.transfers_completed)
        for reason, count in sorted(stats.failures.items()):
            failures.add_metric([*key, reason], count)
        for reason, count in sorted(stats.dropped_frames.items()):
            dropped.add_metric([*key, reason], count)
        buckets = [
            (str(b), n) for b, n in zip(DURATION_BUCKETS, stats.duration_counts, strict=True)
        ]
        buckets.append(("+Inf", stats.transfers_completed))
        seconds.add_metric(key, buckets, stats.duration_sum_s)
    yield from (byte_count, transfers, failures, dropped, seconds)
