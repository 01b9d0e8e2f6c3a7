"""The Prometheus metrics pdserve's processes export (pdserve/metrics.py, pdserve/gpu.py).

Names follow vLLM's (REFERENCE.md section 8) with the ``pdserve_`` prefix and base units; every
series carries a ``tier`` label. The dashboard and the KEDA triggers may only use these names;
tests/deploy/test_nginx_grpc_proxy.py scrapes a real cluster and checks this table against what
each tier serves, so a renamed metric fails there before a dashboard goes blank.
"""

from __future__ import annotations

import re
from enum import Enum


class MetricType(Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


METRICS: dict[str, MetricType] = {
    "pdserve_time_to_first_token_seconds": MetricType.HISTOGRAM,
    "pdserve_inter_token_latency_seconds": MetricType.HISTOGRAM,
    "pdserve_e2e_request_latency_seconds": MetricType.HISTOGRAM,
    "pdserve_request_queue_time_seconds": MetricType.HISTOGRAM,
    "pdserve_request_prefill_time_seconds": MetricType.HISTOGRAM,
    "pdserve_request_decode_time_seconds": MetricType.HISTOGRAM,
    "pdserve_kv_transfer_seconds": MetricType.HISTOGRAM,
    "pdserve_num_requests_running": MetricType.GAUGE,
    "pdserve_num_requests_waiting": MetricType.GAUGE,
    "pdserve_kv_cache_usage_ratio": MetricType.GAUGE,
    "pdserve_kv_cache_blocks": MetricType.GAUGE,
    "pdserve_gpu_available": MetricType.GAUGE,
    "pdserve_gpu_utilization_ratio": MetricType.GAUGE,
    "pdserve_gpu_memory_used_bytes": MetricType.GAUGE,
    "pdserve_gpu_memory_total_bytes": MetricType.GAUGE,
    "pdserve_gpu_power_watts": MetricType.GAUGE,
    "pdserve_gpu_temperature_celsius": MetricType.GAUGE,
    "pdserve_prefix_cache_queries_total": MetricType.COUNTER,
    "pdserve_prefix_cache_hits_total": MetricType.COUNTER,
    "pdserve_num_preemptions_total": MetricType.COUNTER,
    "pdserve_spec_proposed_tokens_total": MetricType.COUNTER,
    "pdserve_spec_accepted_tokens_total": MetricType.COUNTER,
    "pdserve_spec_verify_steps_total": MetricType.COUNTER,
    "pdserve_prompt_tokens_total": MetricType.COUNTER,
    "pdserve_generation_tokens_total": MetricType.COUNTER,
    "pdserve_kv_transfer_bytes_total": MetricType.COUNTER,
    "pdserve_kv_transfers_total": MetricType.COUNTER,
    "pdserve_kv_transfer_failures_total": MetricType.COUNTER,
    "pdserve_kv_transfer_dropped_frames_total": MetricType.COUNTER,
    "pdserve_router_decisions_total": MetricType.COUNTER,
    "pdserve_router_prefill_picks_total": MetricType.COUNTER,
    "pdserve_router_fallbacks_total": MetricType.COUNTER,
    "pdserve_prefill_retries_total": MetricType.COUNTER,
    "pdserve_decode_resumes_total": MetricType.COUNTER,
    "pdserve_migrations_total": MetricType.COUNTER,
    "pdserve_migration_pause_seconds": MetricType.HISTOGRAM,
    "pdserve_migration_bytes_total": MetricType.COUNTER,
    "pdserve_requests_total": MetricType.COUNTER,
    "pdserve_http_requests_total": MetricType.COUNTER,
}

GPU_DEVICE_METRICS = frozenset(
    name for name in METRICS if name.startswith("pdserve_gpu_") and name != "pdserve_gpu_available"
)
"""Per-device GPU series: exported only where NVML sees a GPU."""
WORKER_ONLY = frozenset(
    {
        "pdserve_request_queue_time_seconds",
        "pdserve_request_prefill_time_seconds",
        "pdserve_request_decode_time_seconds",
        "pdserve_num_requests_running",
        "pdserve_num_requests_waiting",
        "pdserve_kv_cache_usage_ratio",
        "pdserve_kv_cache_blocks",
        "pdserve_num_preemptions_total",
        # Speculative decoding (--speculative): zero where it is off.
        "pdserve_spec_proposed_tokens_total",
        "pdserve_spec_accepted_tokens_total",
        "pdserve_spec_verify_steps_total",
        "pdserve_prefix_cache_queries_total",
        "pdserve_prefix_cache_hits_total",
        "pdserve_kv_transfer_bytes_total",
        "pdserve_kv_transfers_total",
        "pdserve_kv_transfer_failures_total",
        "pdserve_kv_transfer_dropped_frames_total",
        "pdserve_kv_transfer_seconds",
    }
)
GATEWAY_ONLY = frozenset(
    {
        # What the client sees is measured where the client is: at the gateway.
        "pdserve_time_to_first_token_seconds",
        "pdserve_inter_token_latency_seconds",
        "pdserve_e2e_request_latency_seconds",
        "pdserve_requests_total",
        "pdserve_http_requests_total",
        "pdserve_router_decisions_total",
        "pdserve_router_prefill_picks_total",
        "pdserve_router_fallbacks_total",
        "pdserve_prefill_retries_total",
        "pdserve_decode_resumes_total",
        # Live KV migration: the gateway moves a draining decode worker's streams.
        "pdserve_migrations_total",
        "pdserve_migration_pause_seconds",
        "pdserve_migration_bytes_total",
    }
)

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
_NAME = re.compile(r"\bpdserve_[a-z0-9_]+\b")


def series_names(expr: str) -> set[str]:
    """Every ``pdserve_*`` series name a PromQL expression mentions."""
    return set(_NAME.findall(expr))


def metric_of(series: str) -> tuple[str, MetricType] | None:
    """The exported metric a series belongs to (``x_bucket`` -> ``x``), or None if unknown."""
    if series in METRICS and METRICS[series] is not MetricType.HISTOGRAM:
        return series, METRICS[series]
    for suffix in HISTOGRAM_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and METRICS.get(base) is MetricType.HISTOGRAM:
            return base, MetricType.HISTOGRAM
    return None


def check_promql(expr: str) -> list[str]:
    """Problems of one query: unknown names, misused types, unbalanced brackets."""
    problems = []
    names = series_names(expr)
    if not names:
        problems.append("mentions no pdserve metric")
    for name in sorted(names):
        known = metric_of(name)
        if known is None:
            problems.append(f"unknown series {name}")
            continue
        kind = known[1]
        if kind is MetricType.COUNTER and f"rate({name}" not in expr.replace(" ", ""):
            problems.append(f"counter {name} used without rate()")
        if kind is MetricType.HISTOGRAM and not name.endswith(HISTOGRAM_SUFFIXES):
            problems.append(f"histogram {name} used without _bucket/_sum/_count")
    if "histogram_quantile" in expr:
        if "_bucket" not in expr:
            problems.append("histogram_quantile over something that is not a _bucket series")
        if not re.search(r"by \((?:[a-z_]+, )*le\b", expr):
            problems.append("histogram_quantile must aggregate by (le, ...)")
    for opening, closing in ("()", "{}", "[]"):
        if expr.count(opening) != expr.count(closing):
            problems.append(f"unbalanced {opening}{closing}")
    if expr.count('"') % 2:
        problems.append("unbalanced quotes")
    return problems
