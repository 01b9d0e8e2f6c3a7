"""The dashboard's panels, row by row: what ``build_dashboard.py`` lays out as Grafana JSON.

Every query starts with the namespace matcher and uses metric names pdserve exports
(tests/deploy/test_observability.py checks them against the metrics contract).
"""

from __future__ import annotations

from queries import (
    DATASOURCE,
    HTTP_4XX,
    HTTP_5XX,
    NOT_HEALTH,
    NOT_OK,
    QUANTILES,
    SEL,
    Panel,
    Target,
    gauge,
    quantiles,
    rate,
)

__all__ = ["DATASOURCE", "QUANTILES", "ROWS", "SEL", "Panel", "Target"]


ROWS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    (
        "Traffic",
        (
            Panel(
                "Requests / s by gRPC status",
                "reqps",
                (Target(f"sum by (code) ({rate('pdserve_requests_total')})", "{{code}}"),),
                "Finished Generate calls at the gateway, by gRPC status code.",
            ),
            Panel(
                "Error ratio",
                "percentunit",
                (
                    Target(
                        f"sum({rate('pdserve_requests_total', NOT_OK)})"
                        f" / sum({rate('pdserve_requests_total')})",
                        "not OK",
                    ),
                ),
                "Share of Generate calls that ended with a status other than OK.",
            ),
            Panel(
                "HTTP requests / s by route and status",
                "reqps",
                (
                    Target(
                        f"sum by (route, status) ({rate('pdserve_http_requests_total')})",
                        "{{route}} {{status}}",
                    ),
                ),
                "OpenAI-compatible HTTP API requests at the gateway, by route and HTTP status "
                '(route "other": paths the API does not serve). /health counts load '
                "balancers' checks.",
            ),
            Panel(
                "HTTP error ratio",
                "percentunit",
                (
                    Target(
                        f"sum({rate('pdserve_http_requests_total', HTTP_5XX)})"
                        f" / sum({rate('pdserve_http_requests_total', NOT_HEALTH)})",
                        "5xx",
                    ),
                    Target(
                        f"sum({rate('pdserve_http_requests_total', HTTP_4XX)})"
                        f" / sum({rate('pdserve_http_requests_total', NOT_HEALTH)})",
                        "4xx",
                    ),
                ),
                "Share of HTTP API requests (health checks left out) answered with a server "
                "error (503 draining or no worker, 504 past the deadline) or a client error (400 "
                "bad input, 401 token, 404 model, 429 shed by admission).",
            ),
            Panel(
                "Tokens / s",
                "short",
                (
                    Target(
                        f"sum by (tier) ({rate('pdserve_generation_tokens_total')})",
                        "generated {{tier}}",
                    ),
                    Target(
                        f"sum by (tier) ({rate('pdserve_prompt_tokens_total')})",
                        "prompt {{tier}}",
                    ),
                ),
            ),
            Panel(
                "Router decisions / s",
                "short",
                (
                    Target(
                        f"sum by (decision) ({rate('pdserve_router_decisions_total')})",
                        "{{decision}}",
                    ),
                ),
                "Where the gateway sent prompts (e.g. disaggregated vs prefilled on decode).",
            ),
        ),
    ),
    (
        "Routing and failover",
        (
            Panel(
                "Prefill picks / s by reason",
                "short",
                (
                    Target(
                        f"sum by (reason) ({rate('pdserve_router_prefill_picks_total')})",
                        "{{reason}}",
                    ),
                ),
                "Why each prefill worker was chosen: its reported prefix cache holds the prompt, "
                "a recent route took the same prompt start, or the shortest queue.",
            ),
            Panel(
                "Router fallbacks / s",
                "short",
                (
                    Target(
                        f"sum by (reason) ({rate('pdserve_router_fallbacks_total')})",
                        "{{reason}}",
                    ),
                ),
                "Routes that could not take the first choice (affinity worker overloaded, every "
                "prefill worker full or gone, a failed worker reused).",
            ),
            Panel(
                "Retries and resumes / s",
                "short",
                (
                    Target(
                        f"sum by (failed_tier, reason) ({rate('pdserve_prefill_retries_total')})",
                        "retry after {{failed_tier}} {{reason}}",
                    ),
                    Target(
                        f"sum by (outcome) ({rate('pdserve_decode_resumes_total')})",
                        "decode stream {{outcome}}",
                    ),
                ),
                "Attempts retried before the first token, and streams broken after it: resumed "
                "on another decode worker or ended with UNAVAILABLE.",
            ),
            Panel(
                "Migrations / s by outcome",
                "short",
                (
                    Target(
                        f"sum by (outcome) ({rate('pdserve_migrations_total')})",
                        "{{outcome}}",
                    ),
                ),
                "Streams a draining decode worker (scale-in, rollout, node drain) offered: "
                "migrated (moved with their KV to another decode worker), kept (no other worker "
                "had room: they finish on the draining one within its --shutdown-grace) or "
                "failed (the move broke: resumed by re-prefill, see Retries and resumes).",
            ),
            Panel(
                "Migration pause",
                "s",
                quantiles("pdserve_migration_pause_seconds", qs=(0.5, 0.99)),
                "What a migrated stream's client sees: the gap from the draining worker's offer "
                "to the new worker's first token (a fraction of a second: ~0.2 s fixed, plus "
                "the sequence's KV bytes over the link between the two).",
            ),
            Panel(
                "KV moved by migrations",
                "Bps",
                (Target(f"sum({rate('pdserve_migration_bytes_total')})", "moved"),),
                "KV bytes per second that draining decode workers pushed to other decode "
                "workers for migrated streams (decode to decode, on the kv port).",
            ),
        ),
    ),
    (
        "Latency by tier",
        (
            Panel(
                "Time to first token",
                "s",
                quantiles("pdserve_time_to_first_token_seconds"),
                "Measured at the gateway. Prefill scales on its p90 (k8s/overlays/*/keda.yaml).",
            ),
            Panel(
                "Inter-token latency",
                "s",
                quantiles("pdserve_inter_token_latency_seconds"),
                "Measured at the gateway. Decode scales on its p90 (k8s/overlays/*/keda.yaml).",
            ),
            Panel(
                "End-to-end request latency",
                "s",
                quantiles("pdserve_e2e_request_latency_seconds"),
            ),
            Panel(
                "Request phases (p90)",
                "s",
                tuple(
                    Target(
                        f"histogram_quantile(0.9, sum by (le, tier) ({rate(name + '_bucket')}))",
                        f"{phase} {{{{tier}}}}",
                    )
                    for phase, name in (
                        ("queue", "pdserve_request_queue_time_seconds"),
                        ("prefill", "pdserve_request_prefill_time_seconds"),
                        ("decode", "pdserve_request_decode_time_seconds"),
                    )
                ),
            ),
        ),
    ),
    (
        "Load",
        (
            Panel(
                "Running requests",
                "short",
                (Target(gauge("pdserve_num_requests_running"), "{{tier}} {{pod}}"),),
            ),
            Panel(
                "Waiting requests (queue depth)",
                "short",
                (Target(gauge("pdserve_num_requests_waiting"), "{{tier}} {{pod}}"),),
                "Prefill scales on the sum over its pods (deploy/k8s/overlays/*/keda.yaml).",
            ),
            Panel(
                "KV cache usage",
                "percentunit",
                (Target(gauge("pdserve_kv_cache_usage_ratio", "max"), "{{tier}} {{pod}}"),),
                "Share of KV blocks in use. Decode scales on the mean over its pods.",
            ),
            Panel(
                "KV pool size (blocks)",
                "short",
                (Target(gauge("pdserve_kv_cache_blocks", "max"), "{{tier}} {{pod}}"),),
                "Blocks in each worker's pool (block size x blocks = tokens of KV it holds).",
            ),
            Panel(
                "Prefix cache hit ratio",
                "percentunit",
                (
                    Target(
                        f"sum by (tier) ({rate('pdserve_prefix_cache_hits_total')})"
                        f" / sum by (tier) ({rate('pdserve_prefix_cache_queries_total')})",
                        "{{tier}}",
                    ),
                ),
            ),
            Panel(
                "Preemptions / s",
                "short",
                (
                    Target(
                        f"sum by (tier, pod) ({rate('pdserve_num_preemptions_total')})",
                        "{{tier}} {{pod}}",
                    ),
                ),
            ),
        ),
    ),
    (
        "Speculative decoding",
        (
            Panel(
                "Draft acceptance rate",
                "percentunit",
                (
                    Target(
                        f"sum by (tier, pod) ({rate('pdserve_spec_accepted_tokens_total')})"
                        f" / sum by (tier, pod) ({rate('pdserve_spec_proposed_tokens_total')})",
                        "{{tier}} {{pod}}",
                    ),
                ),
                "Share of speculative draft tokens the target model kept (--speculative); no "
                "data where speculation is off. Output is the same either way.",
            ),
            Panel(
                "Tokens per verify step",
                "short",
                (
                    Target(
                        f"(sum by (tier, pod) ({rate('pdserve_spec_accepted_tokens_total')})"
                        f" + sum by (tier, pod) ({rate('pdserve_spec_verify_steps_total')}))"
                        f" / sum by (tier, pod) ({rate('pdserve_spec_verify_steps_total')})",
                        "{{tier}} {{pod}}",
                    ),
                ),
                "Tokens a sequence gains per step that verified a draft (the accepted ones "
                "plus the one the step samples): 1 means speculation saves nothing.",
            ),
        ),
    ),
    (
        "KV transfer",
        (
            Panel(
                "KV transfer throughput",
                "Bps",
                (
                    Target(
                        f"sum by (tier, pod) ({rate('pdserve_kv_transfer_bytes_total')})",
                        "{{tier}} {{pod}}",
                    ),
                ),
                "KV page bytes sent (prefill) and received (decode) per second.",
            ),
            Panel(
                "KV transfers / s",
                "short",
                (
                    Target(
                        f"sum by (tier, backend) ({rate('pdserve_kv_transfers_total')})",
                        "{{tier}} ({{backend}})",
                    ),
                ),
                "Completed transfers (one per disaggregated request).",
            ),
            Panel(
                "KV transfer time",
                "s",
                quantiles("pdserve_kv_transfer_seconds"),
            ),
            Panel(
                "KV transfer failures and dropped frames / s",
                "short",
                (
                    Target(
                        f"sum by (reason, backend) ({rate('pdserve_kv_transfer_failures_total')})",
                        "failed: {{reason}} ({{backend}})",
                    ),
                    Target(
                        "sum by (reason, backend) "
                        f"({rate('pdserve_kv_transfer_dropped_frames_total')})",
                        "dropped frames: {{reason}} ({{backend}})",
                    ),
                ),
                "Any non-zero value deserves a look: each failed transfer is a failed request; "
                "dropped frames were unauthenticated, malformed or late.",
            ),
        ),
    ),
    (
        "GPU",
        (
            Panel(
                "GPU telemetry available",
                "short",
                (Target(gauge("pdserve_gpu_available", "max"), "{{tier}} {{pod}}"),),
                "1 where NVML sees GPUs; 0 on CPU pods (and then no other GPU series).",
            ),
            Panel(
                "GPU utilization",
                "percentunit",
                (
                    Target(
                        gauge("pdserve_gpu_utilization_ratio", "max", "pod, gpu"), "{{pod}}/{{gpu}}"
                    ),
                ),
            ),
            Panel(
                "GPU memory",
                "bytes",
                (
                    Target(
                        gauge("pdserve_gpu_memory_used_bytes", "max", "pod, gpu"),
                        "used {{pod}}/{{gpu}}",
                    ),
                    Target(
                        gauge("pdserve_gpu_memory_total_bytes", "max", "pod, gpu"),
                        "total {{pod}}/{{gpu}}",
                    ),
                ),
            ),
            Panel(
                "GPU power",
                "watt",
                (Target(gauge("pdserve_gpu_power_watts", "max", "pod, gpu"), "{{pod}}/{{gpu}}"),),
            ),
            Panel(
                "GPU temperature",
                "celsius",
                (
                    Target(
                        gauge("pdserve_gpu_temperature_celsius", "max", "pod, gpu"),
                        "{{pod}}/{{gpu}}",
                    ),
                ),
            ),
        ),
    ),
)
