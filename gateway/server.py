"""Entry point of the gateway (``pdserve gateway``)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import structlog
from prometheus_client import CollectorRegistry
from transformers import AutoTokenizer

from engine.config import ModelConfig
from engine.model_loader import describe_model, load_hf_config, resolve_model_path
from gateway.generation import GenerationCore
from gateway.prompts import PromptTokenizer
from gateway.router import RoundRobinRouter
from gateway.servicer import GenerationServicer
from gateway.worker_clients import DecodeClient, PrefillClient
from pdserve.gpu import register_gpu_metrics
from pdserve.grpc_runtime import serve_until_signalled, start_server
from pdserve.metrics import GatewayMetrics, serve_metrics
from protos.pdserve.v1 import generation_pb2, generation_pb2_grpc

log = structlog.get_logger(__name__)

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


@dataclass(frozen=True)
class GatewayConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    listen: str = "127.0.0.1:50051"
    prefill: tuple[str, ...] = field(default_factory=tuple)
    """Prefill worker addresses; none means every prompt is computed on a decode worker."""
    decode: tuple[str, ...] = field(default_factory=tuple)
    metrics_port: int = 9100
    """Prometheus /metrics port (0: off)."""


def build_core(config: GatewayConfig, metrics: GatewayMetrics | None = None) -> GenerationCore:
    """Tokenizer and model limits (no weights), plus clients for every configured worker."""
    path = resolve_model_path(config.model)
    spec = describe_model(config.model.model, path, load_hf_config(path))
    max_len = min(spec.max_model_len, config.model.max_model_len or spec.max_model_len)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    vocab = min(len(tokenizer), spec.vocab_size)
    router = RoundRobinRouter(
        [PrefillClient(a) for a in config.prefill], [DecodeClient(a) for a in config.decode]
    )
    prompts = PromptTokenizer(tokenizer, max_len, vocab)
    return GenerationCore(tokenizer, prompts, max_len, router, metrics)


async def serve(config: GatewayConfig, grace_s: float = 5.0) -> None:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    register_gpu_metrics(registry, "gateway")
    core = build_core(config, metrics)
    servicer = GenerationServicer(core, metrics)
    serve_metrics(config.metrics_port, registry)
    handle = await start_server(
        config.listen,
        [SERVICE_NAME],
        [functools.partial(generation_pb2_grpc.add_GenerationServicer_to_server, servicer)],
    )
    log.info(
        "gateway_ready",
        listen=config.listen,
        port=handle.port,
        prefill=list(config.prefill),
        decode=list(config.decode),
        mode="disaggregated" if config.prefill else "colocated",
    )
    try:
        await serve_until_signalled(handle, [SERVICE_NAME], grace_s)
    finally:
        await core.router.close()
