"""The HTTP app over a real GenerationCore on fake workers (tests/gateway/fakes.py)."""

from __future__ import annotations

import json
from typing import Any

import httpx2 as httpx
from prometheus_client import CollectorRegistry

from gateway.generation import GenerationCore
from gateway.openai_api.app import build_app
from gateway.openai_api.convert import ServedModel
from gateway.openai_api.serving import OpenAIServing
from gateway.prompts import PromptTokenizer
from gateway.router import Router, RoutingConfig
from server_runtime.grpc_runtime import Lifecycle
from server_runtime.metrics import GatewayMetrics
from tests.gateway.fakes import FakeDecode, FakePrefill, entry, registry
from tests.support.tokenizers import build_byte_level_tokenizer

MAX_MODEL_LEN = 256
MODEL = "/models/tiny-chat"
TOKENIZER = build_byte_level_tokenizer(512)


class Harness:
    def __init__(
        self,
        *,
        prefill: bool = True,
        decode: bool = True,
        tokens: tuple[str, ...] = (),
        lifecycle: Lifecycle | None = None,
    ) -> None:
        self.decode = FakeDecode("d0")
        self.prefill = FakePrefill("p0")
        reg = registry(
            [entry(self.prefill)] if prefill else [], [entry(self.decode)] if decode else []
        )
        router = Router(reg, RoutingConfig(affinity_tokens=0))
        prompts = PromptTokenizer(TOKENIZER, MAX_MODEL_LEN, 512)
        self.metrics_registry = CollectorRegistry()
        self.metrics = GatewayMetrics(self.metrics_registry)
        self.core = GenerationCore(TOKENIZER, prompts, MAX_MODEL_LEN, router, self.metrics)
        self.lifecycle = lifecycle or Lifecycle()
        served = ServedModel.of(MODEL, ("tiny",), MAX_MODEL_LEN, "abc123")
        self.serving = OpenAIServing(self.core, self.lifecycle, served, self.metrics)
        self.app = build_app(self.serving, tokens, self.metrics)

    def client(self, **headers: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app),
            base_url="http://test",
            headers=headers,
        )

    def count(self, route: str, status: int) -> float:
        labels = {"tier": "gateway", "route": route, "status": str(status)}
        return self.metrics_registry.get_sample_value("pdserve_http_requests_total", labels) or 0


def events(body: str) -> list[Any]:
    """The SSE payloads of a stream, checking the framing; ``[DONE]`` last, as a string."""
    assert body.endswith("\n\n"), body[-80:]
    frames = body[:-2].split("\n\n")
    out: list[Any] = []
    for frame in frames:
        assert frame.startswith("data: "), frame
        data = frame.removeprefix("data: ")
        out.append(data if data == "[DONE]" else json.loads(data))
    assert out[-1] == "[DONE]" and "[DONE]" not in out[:-1]
    return out
