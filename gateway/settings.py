"""The gateway's settings (flags and ``PDSERVE_*`` variables), declared once, and the
:class:`~gateway.server.GatewayConfig` built from them.

Torch-free, and light at import time: ``pdserve``'s parser declares these on ``gateway`` and
``up``; the gateway's modules are imported when the configuration is built.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from core.settings import Group, Setting, port
from core.tls import TLSConfig
from engine.settings import MODEL, model_config
from server_runtime.settings import (
    AUTH_TOKEN_ENV,
    DRAIN,
    LOG,
    METRICS_PORT,
    SERVER_TLS,
    auth_tokens,
    keepalive,
    server_tls,
)

if TYPE_CHECKING:
    from gateway.server import GatewayConfig

SERVER = Group(
    None,
    (
        Setting("--listen", default="127.0.0.1:50051"),
        Setting(
            "--prefill",
            repeat=True,
            help="prefill worker address (repeat, or comma-separate); none: colocated",
        ),
        Setting("--decode", repeat=True, help="decode worker address (repeat, or comma-separate)"),
        METRICS_PORT.with_default(9100),
    ),
)

HTTP = Group(
    "OpenAI-compatible HTTP API",
    (
        Setting(
            "--http-port",
            field="http_port",
            type=port,
            default=8000,
            help="port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
            "/v1/models, /health, /tokenize, /detokenize) on --listen's host (0: off)",
        ),
        Setting(
            "--served-model-name",
            repeat=True,
            help="a name the HTTP API serves the model as, besides --model and its basename "
            "(repeat; the first is the id /v1/models lists)",
        ),
    ),
)

ROUTING = Group(
    "routing and fleet",
    (
        Setting(
            "--router",
            field="routing.policy",
            choices=["load-aware", "round-robin"],
            default="load-aware",
            help="load-aware: decode least loaded, prefill shortest queue with prefix affinity",
        ),
        Setting(
            "--local-prefill-below",
            field="routing.local_prefill_below",
            type=int,
            default=0,
            help="prompts with fewer tokens prefill on the decode worker (0: never)",
        ),
        Setting(
            "--prefill-saturated-queue",
            field="routing.prefill_saturated_queue",
            type=int,
            default=0,
            help="when every prefill worker has this many prompts, prefill on a decode worker "
            "with headroom (0: never)",
        ),
        Setting(
            "--max-attempts",
            type=int,
            default=4,
            help="routes tried per request: failed prefills retried, broken streams resumed",
        ),
        Setting(
            "--kv-arrival-timeout",
            type=float,
            default=5.0,
            help="seconds a prefill's KV pages may take to reach the decode worker after the "
            "prefill answered; later, the request is resumed on another route (0: no limit "
            "but the deadline)",
        ),
        Setting(
            "--load-interval-ms",
            field="fleet.load_interval_ms",
            type=int,
            default=250,
            help="how often each worker reports its load",
        ),
        Setting(
            "--stale-after",
            field="fleet.stale_after_s",
            type=float,
            default=1.5,
            help="seconds without a load report before a worker stops receiving work",
        ),
        Setting(
            "--resolve-interval",
            field="fleet.resolve_interval_s",
            type=float,
            default=5.0,
            help="seconds between DNS resolutions of dns:///name:port worker targets",
        ),
    ),
)

ADMISSION = Group(
    "admission",
    (
        Setting(
            "--max-concurrent-requests",
            field="admission.max_concurrent_requests",
            type=int,
            default=256,
            help="requests streaming at once (0: no bound)",
        ),
        Setting(
            "--max-queued-requests",
            field="admission.max_queued_requests",
            type=int,
            default=256,
            help="requests waiting for a slot; past that RESOURCE_EXHAUSTED with a retry delay",
        ),
        Setting(
            "--max-prompt-tokens",
            field="admission.max_prompt_tokens",
            type=int,
            default=0,
            help="refuse longer prompts with INVALID_ARGUMENT (0: the context length bounds them)",
        ),
        Setting(
            "--retry-after-ms",
            type=int,
            default=500,
            help="the retry delay sent with RESOURCE_EXHAUSTED",
        ),
    ),
)

AUTH_TOKEN_FILE = Setting(
    "--auth-token-file",
    type=Path,
    help=f"file of accepted bearer tokens, one per line (or set {AUTH_TOKEN_ENV}); requests "
    "without one get UNAUTHENTICATED",
)

UPSTREAM_TLS = (
    Setting(
        "--upstream-tls-ca",
        type=Path,
        help="CA that signs the workers' certificates: TLS towards workers",
    ),
    Setting(
        "--upstream-tls-cert",
        type=Path,
        help="this gateway's client certificate towards workers (mutual TLS)",
    ),
    Setting("--upstream-tls-key", type=Path, help="its PEM key"),
    Setting(
        "--upstream-tls-server-name",
        help="name to check workers' certificates against (default: the address's host)",
    ),
)

SECURITY = Group("security", (AUTH_TOKEN_FILE, *UPSTREAM_TLS))

FLEET = (HTTP, ROUTING, ADMISSION, SECURITY)
"""What ``pdserve gateway`` and ``pdserve up`` both take."""

GROUPS = (SERVER, MODEL, LOG, *FLEET, SERVER_TLS, DRAIN)
"""Every setting of ``pdserve gateway``."""


def split_addresses(values: Sequence[str]) -> tuple[str, ...]:
    """``--prefill a,b --prefill c`` -> ``("a", "b", "c")``."""
    return tuple(a.strip() for v in values for a in v.split(",") if a.strip())


def upstream_tls(args: argparse.Namespace) -> TLSConfig | None:
    if args.upstream_tls_ca is None and args.upstream_tls_cert is None:
        return None
    return TLSConfig(
        cert=args.upstream_tls_cert,
        key=args.upstream_tls_key,
        ca=args.upstream_tls_ca,
        server_name=args.upstream_tls_server_name,
    )


def gateway_config(args: argparse.Namespace) -> GatewayConfig:
    """The gateway's configuration from its flags (imports the gateway's modules)."""
    from gateway.generation import FailoverConfig
    from gateway.router import RoutingConfig
    from gateway.server import AdmissionConfig, FleetConfig, GatewayConfig, SecurityConfig

    return GatewayConfig(
        model=model_config(args),
        listen=args.listen,
        prefill=split_addresses(args.prefill),
        decode=split_addresses(args.decode),
        metrics_port=args.metrics_port,
        **HTTP.fields(args),
        served_model_name=tuple(args.served_model_name),
        routing=RoutingConfig(**ROUTING.fields(args, "routing")),
        fleet=FleetConfig(**ROUTING.fields(args, "fleet")),
        admission=AdmissionConfig(
            **ADMISSION.fields(args, "admission"), retry_after_s=int(args.retry_after_ms) / 1000
        ),
        failover=FailoverConfig(
            max_attempts=max(1, int(args.max_attempts)),
            kv_arrival_timeout_s=float(args.kv_arrival_timeout),
        ),
        keepalive=keepalive(args),
        security=SecurityConfig(
            tls=server_tls(args),
            upstream_tls=upstream_tls(args),
            auth_tokens=auth_tokens(args.auth_token_file),
        ),
    )
