"""``n`` samples of one prompt (GenerateRequest.n, OpenAI's ``n``), sharing the prompt's KV.

Sample 0 is sent first. Once the prompt's KV is in the prefix caches of its workers (its decode
stream's first token: :func:`gateway.attempt.run_attempt`), or once it finished, samples 1..n-1
start on the same workers (:meth:`Router.pinned`; normal routing if those are gone or full),
so each finds the prompt's full blocks cached and shares them (ref-counted by the pool) rather
than computing or receiving them again::

    sample 0:  route -> prefill computes the prompt -> t1 -> decode admits it -> t2 ...
    sample 1..n-1:                                 (pinned to the same route) -> prefix hit

Each sample is an independent generation with its own failover, and its own request id on the
workers (``<id>-<i>``). Sample ``i`` of a sampled request draws from ``seed + i`` (vLLM's
convention, modulo 2**64); the request's seed is sample 0's. Deltas of all samples interleave,
told apart by :attr:`Delta.index`; each sample ends with its own finish delta. A failure of any
sample fails the request; leaving the generator early cancels every sample, which ends every
worker call and frees every block.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import grpc
import structlog

from core.errors import InvalidRequestError
from core.sampling import SamplingParams
from gateway.generation import Delta, GenerationCore
from gateway.router import Route
from gateway.seeds import sample_seed, with_seed
from server_runtime.grpc_runtime import Lifecycle, Refused

log = structlog.get_logger(__name__)

MAX_SAMPLES = 16
QUEUE_PER_SAMPLE = 8  # deltas a sample may run ahead of the client (backpressure)


def validate_samples(n: int) -> None:
    """Raise InvalidRequestError unless ``n`` is in [1, MAX_SAMPLES]."""
    if not 1 <= n <= MAX_SAMPLES:
        raise InvalidRequestError(f"n must be in [1, {MAX_SAMPLES}], got {n}")


class SampleSlots:
    """The admission slots samples 1..n-1 take in the gateway's :class:`Lifecycle` (the call's
    own slot is sample 0's), so n samples count as n requests towards its bound.

    They are taken at once or not at all (:meth:`take` raises :class:`Refused`, with
    RESOURCE_EXHAUSTED and a retry delay, when the bound has no room for them now): a request
    holding one slot while queueing for more could starve with others doing the same.
    """

    def __init__(self, lifecycle: Lifecycle | None, n: int) -> None:
        self._lifecycle = lifecycle
        self._extra = n - 1
        self._held = 0

    async def take(self) -> None:
        lc = self._lifecycle
        if lc is None or self._extra <= 0:
            return
        bound = lc.max_in_flight
        if bound and self._extra + 1 > bound:
            raise InvalidRequestError(
                f"n={self._extra + 1} samples exceed this gateway's bound of {bound} requests "
                "in flight (--max-concurrent-requests)"
            )
        if bound and lc.in_flight + self._extra > bound:
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server is at capacity for {self._extra + 1} samples: {lc.in_flight} requests "
                f"in progress (limit {bound}); retry later",
                lc.retry_after_s,
            )
        for _ in range(self._extra):  # room checked above: each enter() takes a slot at once
            await lc.enter(0)
            self._held += 1

    def release(self) -> None:
        if self._lifecycle is not None:
            for _ in range(self._held):
                self._lifecycle.leave()
        self._held = 0


@dataclass(frozen=True)
class _Failed:
    error: BaseException


async def generate_samples(
    core: GenerationCore,
    request_id: str,
    prompt: list[int],
    sampling: SamplingParams,
    n: int,
    timeout: float | None,
) -> AsyncGenerator[Delta, None]:
    """The deltas of ``n`` samples of ``prompt``, interleaved (see the module docstring)."""
    if n == 1:
        async with contextlib.aclosing(core.generate(request_id, prompt, sampling, timeout)) as one:
            async for delta in one:
                yield delta
        return
    if sampling.seed is None and not sampling.greedy:
        sampling = with_seed(sampling, n)
        log.info("seed_assigned", seed=sampling.seed, n=n)
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    queue: asyncio.Queue[Delta | _Failed] = asyncio.Queue(QUEUE_PER_SAMPLE * n)
    tasks: list[asyncio.Task[None]] = []

    def start(index: int, route: Route | None) -> None:
        seeded = sampling
        if sampling.seed is not None:
            seeded = dataclasses.replace(sampling, seed=sample_seed(sampling.seed, index))
        left = None if deadline is None else max(0.0, deadline - loop.time())
        stream = core.generate(
            f"{request_id}-{index}",
            prompt,
            seeded,
            left,
            index=index,
            pin=route,
            on_cached=start_siblings if index == 0 else None,
        )
        tasks.append(asyncio.create_task(_pump(index, stream, queue)))

    def start_siblings(route: Route | None) -> None:
        if len(tasks) > 1:
            return  # already started
        log.info("samples_started", n=n, pinned=route is not None)
        for index in range(1, n):
            start(index, route)

    start(0, None)
    finished = 0
    try:
        while finished < n:
            item = await queue.get()
            if isinstance(item, _Failed):
                raise item.error
            if item.finish_reason is not None:
                finished += 1
                if item.index == 0:
                    start_siblings(None)  # it ended before its prompt KV was known cached
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _pump(
    index: int, stream: AsyncGenerator[Delta, None], queue: asyncio.Queue[Delta | _Failed]
) -> None:
    structlog.contextvars.bind_contextvars(sample=index)  # this task's own context
    try:
        async with contextlib.aclosing(stream):
            async for delta in stream:
                await queue.put(delta)
    except Exception as exc:
        await queue.put(_Failed(exc))
