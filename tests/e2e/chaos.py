"""What the chaos tests share: seeded prompts for the tiny models, a greedy stream recorded as a
:class:`Run` (tokens, the error it ended with, when), and the check that every pool is idle.

A run's ``error`` is ``""`` for a stream that finished, else ``"<CODE>: <details>"`` for a gRPC
status, or the exception's repr; greedy runs of the same prompt are token-identical on any
worker, so a fault's outcome is judged against an undisturbed run of the same prompts.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc

from pdserve.client import AsyncClient, RetryPolicy
from protos.pdserve.v1 import worker_pb2

DEADLINE_S = 60.0


def prompt(seed: int, length: int) -> list[int]:
    """``length`` token ids from a tiny model's vocabulary (512), the same for the same seed."""
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(length)]


@dataclass
class Run:
    tokens: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    """Monotonic time each chunk arrived."""
    error: str = ""
    done_at: float = 0.0


async def greedy(
    client: AsyncClient,
    prompt_ids: list[int],
    max_tokens: int,
    out: Run,
    timeout: float | None = DEADLINE_S,
) -> Run:
    """Stream ``prompt_ids`` greedily into ``out`` (ignoring EOS); never raises."""
    try:
        async for chunk in client.generate(
            prompt_token_ids=prompt_ids,
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=True,
            timeout=timeout,
        ):
            out.tokens.extend(chunk.token_ids)
            out.arrivals.append(time.monotonic())
    except grpc.aio.AioRpcError as exc:  # recorded, asserted by the caller
        out.error = f"{exc.code().name}: {exc.details()}"
    except Exception as exc:  # recorded, asserted by the caller
        out.error = repr(exc)
    out.done_at = time.monotonic()
    return out


async def greedy_all(
    gateway: str,
    prompts: list[list[int]],
    max_tokens: int,
    timeout: float | None = DEADLINE_S,
    retry: RetryPolicy | None = None,
) -> list[Run]:
    """``prompts`` at once; ``retry``: the client's (``NO_RETRY``: the gateway's outcome)."""
    async with AsyncClient(gateway, **({"retry": retry} if retry else {})) as client:
        return list(
            await asyncio.gather(*[greedy(client, p, max_tokens, Run(), timeout) for p in prompts])
        )


def assert_idle(statuses: Iterable[worker_pb2.WorkerStatus]) -> None:
    """Every pool all free; nothing running, waiting or pending; the pool's books consistent."""
    for status in statuses:
        assert status.free_blocks == status.total_blocks, status
        assert status.running == 0 and status.waiting == 0, status
        assert status.pending_transfers == 0 and status.pool_ok, status
