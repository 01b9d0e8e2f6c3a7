"""Entry point of the gateway (``pdserve gateway``)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import structlog
from prometheus_client import CollectorRegistry

from core.tls import TLSConfig
from engine.config import ModelConfig
from engine.model_files import ModelSpec, describe_model, resolve_model_path
from gateway.awake_clock import AwakeClock
from gateway.errors import NoWorkersError
from gateway.generation import FailoverConfig, GenerationCore
from gateway.openai_api.app import build_app
from gateway.openai_api.convert import ServedModel
from gateway.openai_api.http_server import HttpServer, host_of
from gateway.openai_api.serving import OpenAIServing
from gateway.prompts import PromptTokenizer
from gateway.registry import Registry, TierRegistry
from gateway.router import Router, RoutingConfig
from gateway.servicer import STATUS_CODES, WORK_METHODS, GenerationServicer
from gateway.tokenizer import load_tokenizer
from gateway.worker_clients import DecodeClient, PrefillClient
from protos.pdserve.v1 import generation_pb2, generation_pb2_grpc
from server_runtime.gpu import register_gpu_metrics
from server_runtime.grpc_runtime import Lifecycle, serve_until_signalled, start_server
from server_runtime.interceptors import BearerAuth, CallScope
from server_runtime.metrics import GatewayMetrics, serve_metrics
from server_runtime.settings import KeepAlive
from server_runtime.torch_guard import forbid_torch

log = structlog.get_logger(__name__)

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


@dataclass(frozen=True)
class FleetConfig:
    """How the gateway finds and follows workers."""

    load_interval_ms: int = 250
    """How often each worker reports its load."""
    stale_after_s: float = 1.5
    """A worker whose last load report is older stops receiving work."""
    resolve_interval_s: float = 5.0
    """How often ``dns:///`` targets are resolved again."""


@dataclass(frozen=True)
class AdmissionConfig:
    max_concurrent_requests: int = 256
    """Requests streaming at once (0: no bound)."""
    max_queued_requests: int = 256
    """Requests waiting for a slot beyond that; past both, RESOURCE_EXHAUSTED with RetryInfo."""
    max_prompt_tokens: int = 0
    """Longer prompts are refused with INVALID_ARGUMENT (0: the model's context bounds them)."""
    retry_after_s: float = 0.5
    """The RetryInfo delay sent with RESOURCE_EXHAUSTED."""


@dataclass(frozen=True)
class SecurityConfig:
    tls: TLSConfig | None = None
    """The public listener's TLS (``require_client_cert`` makes clients present one too)."""
    upstream_tls: TLSConfig | None = None
    """TLS towards workers: their CA, and this gateway's client certificate for mTLS."""
    auth_tokens: tuple[str, ...] = ()
    """Bearer tokens accepted on the public API; none: no authentication."""


@dataclass(frozen=True)
class GatewayConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    listen: str = "127.0.0.1:50051"
    prefill: tuple[str, ...] = field(default_factory=tuple)
    """Prefill worker targets (``host:port`` or ``dns:///name:port``); none: colocated."""
    decode: tuple[str, ...] = field(default_factory=tuple)
    metrics_port: int = 9100
    """Prometheus /metrics port (0: off)."""
    http_port: int = 8000
    """Port of the OpenAI-compatible HTTP API, on ``listen``'s host (0: off)."""
    served_model_name: tuple[str, ...] = ()
    """Names the HTTP API serves the model as, besides ``model.model`` and its basename."""
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    failover: FailoverConfig = field(default_factory=FailoverConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    keepalive: KeepAlive = field(default_factory=KeepAlive)
    """Pings to clients, so a hung one cannot hold calls, KV or admission slots."""


def build_registry(config: GatewayConfig) -> Registry:
    if not config.decode:
        raise NoWorkersError("the gateway needs at least one decode worker target")
    tls = config.security.upstream_tls
    fleet = config.fleet
    clock = AwakeClock()  # one for both tiers: the gateway's own awake time

    def tier(name: str, targets: tuple[str, ...], client: type) -> TierRegistry:
        return TierRegistry(
            name,
            targets,
            lambda address: client(address, tls),
            load_interval_ms=fleet.load_interval_ms,
            stale_after_s=fleet.stale_after_s,
            resolve_interval_s=fleet.resolve_interval_s,
            clock=clock,
        )

    return Registry(
        tier("prefill", config.prefill, PrefillClient), tier("decode", config.decode, DecodeClient)
    )


def model_spec(config: GatewayConfig) -> ModelSpec:
    return describe_model(config.model.model, resolve_model_path(config.model))


def build_core(
    config: GatewayConfig, metrics: GatewayMetrics | None = None, spec: ModelSpec | None = None
) -> GenerationCore:
    """Tokenizer and model limits (no weights), plus the router over the worker registry
    (call :meth:`Registry.start` inside the event loop before serving)."""
    spec = spec or model_spec(config)
    path = spec.path
    max_len = min(spec.max_model_len, config.model.max_model_len or spec.max_model_len)
    tokenizer = load_tokenizer(path)
    vocab = min(len(tokenizer), spec.vocab_size)
    router = Router(build_registry(config), config.routing)
    prompts = PromptTokenizer(tokenizer, max_len, vocab)
    return GenerationCore(
        tokenizer,
        prompts,
        max_len,
        router,
        metrics,
        max_prompt_tokens=config.admission.max_prompt_tokens,
        failover=config.failover,
    )


async def serve(config: GatewayConfig, grace_s: float = 5.0) -> None:
    """Serve until SIGTERM; then drain: streams in flight have ``grace_s`` to finish.

    The process entry point of the gateway: torch is hidden from here on (it must not load).
    """
    forbid_torch()
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    register_gpu_metrics(registry, "gateway")
    spec = model_spec(config)
    core = build_core(config, metrics, spec)
    admission = config.admission
    lifecycle = Lifecycle(
        admission.max_concurrent_requests, admission.max_queued_requests, admission.retry_after_s
    )
    servicer = GenerationServicer(core, metrics, lifecycle)
    serve_metrics(config.metrics_port, registry)
    interceptors = [CallScope(lifecycle, WORK_METHODS, STATUS_CODES)]
    if config.security.auth_tokens:
        interceptors.insert(0, BearerAuth(config.security.auth_tokens))
    await core.router.registry.start()
    http = None
    if config.http_port:
        served = ServedModel.of(
            config.model.model, config.served_model_name, core.max_model_len, spec.fingerprint
        )
        serving = OpenAIServing(core, lifecycle, served, metrics)
        app = build_app(serving, config.security.auth_tokens, metrics)
        http = HttpServer(app, host_of(config.listen), config.http_port, tls=config.security.tls)
        await http.start()
    handle = await start_server(
        config.listen,
        [SERVICE_NAME],
        [functools.partial(generation_pb2_grpc.add_GenerationServicer_to_server, servicer)],
        tls=config.security.tls,
        lifecycle=lifecycle,
        interceptors=interceptors,
        keepalive=config.keepalive,
    )
    log.info(
        "gateway_ready",
        listen=config.listen,
        port=handle.port,
        prefill=list(config.prefill),
        decode=list(config.decode),
        mode="disaggregated" if config.prefill else "colocated",
        policy=config.routing.policy,
        tls=config.security.tls is not None,
        upstream_tls=config.security.upstream_tls is not None,
        auth=bool(config.security.auth_tokens),
        http_port=http.port if http is not None else 0,
    )
    try:
        await serve_until_signalled(
            handle, [SERVICE_NAME], grace_s, ready=core.router.registry.wait_ready()
        )
    finally:
        if http is not None:
            await http.stop()
        await core.router.registry.close()
