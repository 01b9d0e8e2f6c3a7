"""The benchmark's OpenAI-compatible client: any ``/v1/completions`` or ``/v1/chat/completions``
server (pdserve's gateway, vLLM's OpenAI server, ...) streamed over SSE and timed as the gRPC
path (:mod:`pdserve.bench.stream`) times pdserve.

Every request is sent with ``stream: true`` and ``stream_options: {include_usage: true}``, the
prompt as its exact token ids (completions) or as their decoded text in one user message
(chat), ``max_tokens`` = its output length, ``ignore_eos`` (vLLM's extension) and the
temperature. Times come from the arrival of the SSE bytes (``time.perf_counter()`` when the
read returns), as vLLM's ``bench serve`` takes them:

- each ``data:`` event whose first choice carries text (``text``, or chat's ``delta.content``)
  is a token event: the first one is TTFT, each later one adds one inter-token gap, the last
  one ends E2E latency; a chat stream's opening ``role`` chunk (empty content) is not a token;
- the output token count is the final ``usage.completion_tokens`` (else the token events);
- a server that reports a running ``usage`` on every chunk (vLLM's ``continuous_usage_stats``)
  lets a chunk carrying k new tokens count as k equal gaps, as vLLM's and SGLang's benchmarks
  spread a multi-token chunk; without it a chunk is one gap, as on the gRPC path.
  :attr:`OpenAITarget.continuous_usage` asks for it (vLLM has it, pdserve's gateway does not).

A target with :attr:`OpenAITarget.exact_lengths` (the vLLM peer of ``--compare``) also fails a
request whose usage does not count exactly its prompt and its ``max_tokens``: a peer that
stopped early, or read other prompt tokens, did other work than pdserve did.

A non-200 answer, an ``error`` event, or a stream that ends without a finish reason is a
failed request. 429 before the first token is retried after its ``Retry-After`` (TTFT includes
the wait), as the gRPC path retries RESOURCE_EXHAUSTED. One :class:`httpx.AsyncClient` per run:
HTTP/1.1 keep-alive, a pool as large as the concurrency.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx2 as httpx

from pdserve.bench.datasets import BenchRequest
from pdserve.bench.load import LoadSpec, run_load
from pdserve.bench.metrics import RequestOutcome, compute_metrics
from pdserve.bench.report import RunResult
from pdserve.bench.runner import ClientOptions, RunSettings, warmup_request
from pdserve.bench.settings import ENDPOINTS
from pdserve.bench.sse import SseParser, StreamTimer, failed

_PATHS = {"completions": "/completions", "chat": "/chat/completions"}
DEFAULT_RETRY_DELAY_S = 0.1
MAX_RETRY_DELAY_S = 5.0
CONNECT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class OpenAITarget:
    """Where and how the requests go."""

    base_url: str
    """Up to and including ``/v1``, e.g. ``http://127.0.0.1:8000/v1``."""
    endpoint: str = "completions"
    """``completions`` (token-id prompts) or ``chat`` (the prompts' text, ``prompt_text``)."""
    model: str | None = None
    """The ``model`` field; None: the first id ``GET /models`` lists."""
    continuous_usage: bool = False
    """Ask for a running ``usage`` on every chunk (``stream_options.continuous_usage_stats``)."""
    exact_lengths: bool = False
    """Fail a request unless its usage reports exactly its prompt and output lengths."""

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must be an http:// or https:// URL: {self.base_url!r}")
        if self.exact_lengths and self.endpoint != "completions":
            raise ValueError("exact lengths need the completions endpoint (chat adds a template)")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + _PATHS[self.endpoint]


def payload(
    target: OpenAITarget,
    model: str,
    request: BenchRequest,
    temperature: float,
    prompt_text: str | None = None,
) -> dict[str, Any]:
    """The JSON body of one streamed request."""
    body: dict[str, Any] = {"model": model}
    if target.endpoint == "chat":
        if prompt_text is None:
            raise ValueError("the chat endpoint needs each request's prompt text")
        body["messages"] = [{"role": "user", "content": prompt_text}]
        body["max_completion_tokens"] = request.output_len
    else:
        body["prompt"] = list(request.prompt_token_ids)
        body["max_tokens"] = request.output_len
    stream_options = {"include_usage": True}
    if target.continuous_usage:
        stream_options["continuous_usage_stats"] = True
    body.update(
        temperature=temperature,
        ignore_eos=True,
        stream=True,
        stream_options=stream_options,
    )
    return body


def check_lengths(
    outcome: RequestOutcome, request: BenchRequest, timer: StreamTimer
) -> RequestOutcome:
    """``outcome``, or a failure when the usage is missing or counts other than ``request``'s
    prompt tokens and ``max_tokens`` (:attr:`OpenAITarget.exact_lengths`)."""
    if not outcome.success:
        return outcome
    got = (timer.prompt_tokens, timer.completion_tokens)
    if got != (request.prompt_len, request.output_len):
        error = (
            f"usage counted {got[0]} prompt + {got[1]} output tokens, "
            f"sent {request.prompt_len} + max_tokens {request.output_len}"
        )
        return failed(request, outcome.start_s, error)
    return outcome


def _retry_delay(response: httpx.Response, attempt: int) -> float:
    try:
        delay = float(response.headers.get("retry-after", ""))
    except ValueError:
        delay = DEFAULT_RETRY_DELAY_S * 2**attempt
    return min(max(delay, 0.0), MAX_RETRY_DELAY_S)


async def _error_text(response: httpx.Response) -> str:
    body = (await response.aread()).decode("utf-8", "replace")
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:300]
    return f"HTTP {response.status_code}: {message}"


async def send_openai(
    client: httpx.AsyncClient,
    target: OpenAITarget,
    model: str,
    request: BenchRequest,
    origin: float,
    *,
    temperature: float = 0.0,
    timeout_s: float | None = None,
    max_attempts: int = 1,
    prompt_text: str | None = None,
) -> RequestOutcome:
    """Stream ``request`` to ``target`` and time it from the SSE chunks' arrival."""
    body = payload(target, model, request, temperature, prompt_text)
    timer = StreamTimer(sent=time.perf_counter())
    try:
        async with asyncio.timeout(timeout_s):
            for attempt in range(max_attempts):
                async with client.stream("POST", target.url, json=body) as response:
                    if response.status_code == 429 and attempt + 1 < max_attempts:
                        delay = _retry_delay(response, attempt)
                        await response.aclose()
                        await asyncio.sleep(delay)
                        continue
                    if response.status_code != 200:
                        return failed(request, timer.sent - origin, await _error_text(response))
                    await _consume(response.aiter_raw(), timer)
                    break
    except TimeoutError:
        return failed(request, timer.sent - origin, f"timed out after {timeout_s} s")
    except httpx.HTTPError as err:
        return failed(request, timer.sent - origin, f"{type(err).__name__}: {err}")
    prompt_len = timer.prompt_tokens if target.endpoint == "chat" else None
    outcome = timer.outcome(request, origin, prompt_len)
    return check_lengths(outcome, request, timer) if target.exact_lengths else outcome


async def _consume(chunks: AsyncIterator[bytes], timer: StreamTimer) -> None:
    parser = SseParser()
    async for chunk in chunks:
        now = time.perf_counter()
        for data in parser.feed(chunk):
            timer.on_data(data, now)
    now = time.perf_counter()
    for data in parser.close():
        timer.on_data(data, now)


def ssl_context(options: ClientOptions) -> ssl.SSLContext | bool:
    """``--tls-ca``/``--tls-cert``/``--tls-key`` for an https base URL (system roots else)."""
    return True if options.tls is None else options.tls.client_ssl_context()


def make_client(options: ClientOptions, connections: int) -> httpx.AsyncClient:
    """One client for the run: keep-alive HTTP/1.1 with ``connections`` pooled connections."""
    headers = {"authorization": f"Bearer {options.token}"} if options.token else {}
    return httpx.AsyncClient(
        headers=headers,
        verify=ssl_context(options),
        http1=True,
        http2=False,
        limits=httpx.Limits(
            max_connections=connections,
            max_keepalive_connections=connections,
            keepalive_expiry=60.0,
        ),
        timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S),
        trust_env=False,
    )


async def served_model(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model ``GET {base_url}/models`` lists."""
    url = base_url.rstrip("/") + "/models"
    try:
        response = await client.get(url)
    except httpx.HTTPError as err:
        raise RuntimeError(f"GET {url} failed: {type(err).__name__}: {err}") from None
    if response.status_code != 200:
        raise RuntimeError(f"GET {url}: HTTP {response.status_code}: {response.text[:300]}")
    try:
        return str(response.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise RuntimeError(f"GET {url} listed no model: {response.text[:300]}") from None


def pool_size(num_requests: int, load: LoadSpec) -> int:
    """Connections the run can have open at once (the warm-up reuses one)."""
    return max(1, min(num_requests, load.max_concurrency or num_requests))


async def bench_openai_async(
    target: OpenAITarget,
    requests: Sequence[BenchRequest],
    load: LoadSpec,
    settings: RunSettings,
    client_options: ClientOptions | None = None,
    *,
    prompt_texts: Sequence[str] | None = None,
    desc: str = "openai",
) -> tuple[list[RequestOutcome], float, str]:
    """Warm up, then send ``requests`` on ``load``'s schedule: (outcomes, duration, model)."""
    opts = client_options or ClientOptions()
    if target.endpoint == "chat" and (prompt_texts is None or len(prompt_texts) != len(requests)):
        raise ValueError("the chat endpoint needs one prompt text per request")
    texts = {id(r): t for r, t in zip(requests, prompt_texts or (), strict=False)}
    attempts = max(1, opts.retry.max_attempts)
    async with make_client(opts, pool_size(len(requests), load)) as client:
        model = target.model or await served_model(client, target.base_url)

        async def send(request: BenchRequest, origin: float) -> RequestOutcome:
            return await send_openai(
                client,
                target,
                model,
                request,
                origin,
                temperature=settings.temperature,
                timeout_s=settings.timeout_s,
                max_attempts=attempts,
                prompt_text=texts.get(id(request)),
            )

        if settings.num_warmups and requests:
            warm = warmup_request(requests)
            first_text = texts.get(id(requests[0]))
            warm_text = None if first_text is None else first_text[::-1]
            for _ in range(settings.num_warmups):
                outcome = await send_openai(
                    client,
                    target,
                    model,
                    warm,
                    0.0,
                    temperature=settings.temperature,
                    timeout_s=settings.timeout_s,
                    max_attempts=attempts,
                    prompt_text=warm_text,
                )
                if not outcome.success:
                    raise RuntimeError(f"warm-up request to {target.url} failed: {outcome.error}")
        timing = await run_load(
            requests, load, send, desc=desc, disable_progress=settings.disable_progress
        )
    return timing.outcomes, timing.duration_s, model


def bench_openai(
    target: OpenAITarget,
    requests: Sequence[BenchRequest],
    load: LoadSpec,
    settings: RunSettings,
    *,
    label: str = "openai",
    description: str = "",
    client_options: ClientOptions | None = None,
    prompt_texts: Sequence[str] | None = None,
) -> RunResult:
    """Run ``requests`` against an OpenAI-compatible server on ``load``'s schedule
    (``description`` goes before the URL and model in the report)."""
    outcomes, duration, model = asyncio.run(
        bench_openai_async(
            target, requests, load, settings, client_options, prompt_texts=prompt_texts, desc=label
        )
    )
    metrics = compute_metrics(outcomes, duration, settings.slos_ms, settings.percentiles)
    where = f"{target.url} (model {model}, SSE)"
    return RunResult(
        label, f"{description}: {where}" if description else where, load, metrics, outcomes
    )
