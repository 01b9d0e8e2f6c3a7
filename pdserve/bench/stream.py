"""One timed streaming request against a pdserve gateway, measured as vLLM measures it."""

from __future__ import annotations

import time

import grpc

from pdserve.bench.datasets import BenchRequest
from pdserve.bench.metrics import RequestOutcome
from pdserve.client import AsyncClient

_FAILED_FINISH = frozenset({"error", "cancelled"})


async def send_to_gateway(
    client: AsyncClient,
    request: BenchRequest,
    origin: float,
    *,
    temperature: float = 0.0,
    timeout_s: float | None = None,
) -> RequestOutcome:
    """Stream ``request`` (``ignore_eos``, ``max_tokens`` = its output length) and time it.

    TTFT is taken at the first message carrying tokens, each later message carrying tokens adds
    one inter-token gap, and E2E latency ends at the last one. The output token count is the
    server's ``usage.completion_tokens``. Any gRPC error, or a stream that ends without a
    finish reason or with ``error``/``cancelled``, is a failed request.
    """
    sent = time.perf_counter()
    first: float | None = None
    last = sent
    gaps: list[float] = []
    counted = 0
    usage = 0
    finish: str | None = None
    try:
        async for chunk in client.generate(
            prompt_token_ids=list(request.prompt_token_ids),
            max_tokens=request.output_len,
            temperature=temperature,
            ignore_eos=True,
            timeout=timeout_s,
        ):
            now = time.perf_counter()
            if chunk.token_ids:
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
                counted += len(chunk.token_ids)
            usage = chunk.completion_tokens or usage
            finish = chunk.finish_reason or finish
    except grpc.RpcError as err:
        return _failed(request, sent - origin, _describe(err))
    if first is None or finish is None or finish in _FAILED_FINISH:
        return _failed(request, sent - origin, f"stream ended with finish reason {finish}")
    return RequestOutcome(
        success=True,
        prompt_len=request.prompt_len,
        output_tokens=usage or counted,
        ttft_s=first - sent,
        itl_s=tuple(gaps),
        latency_s=last - sent,
        start_s=sent - origin,
    )


def _failed(request: BenchRequest, start_s: float, error: str) -> RequestOutcome:
    return RequestOutcome(
        success=False, prompt_len=request.prompt_len, start_s=start_s, error=error
    )


def _describe(err: grpc.RpcError) -> str:
    code, details = getattr(err, "code", None), getattr(err, "details", None)
    if callable(code) and callable(details):
        return f"{code().name}: {details()}"
    return repr(err)
