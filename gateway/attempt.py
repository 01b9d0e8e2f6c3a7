"""One try of a request on one route, as a stream of :class:`TokenEvent`, and the caller's
deadline as each hop sees it.

Disaggregated (``route.prefill`` set)::

    gateway --Decode.Generate(REMOTE)--> decode: reserves blocks, answers with a ticket
    gateway --Prefill.Prefill(ticket)--> prefill: computes, answers with the first token,
                                         pushes KV pages to the ticket's endpoint meanwhile
    gateway <--kv_arrived--------------- decode: every page is in
    gateway <--tokens 2..n-------------- decode: admits the sequence, streams the rest

Otherwise one ``Decode.Generate(LOCAL)`` call streams every token. The decode stream is watched
while the prefill runs: a decode worker that fails meanwhile fails the attempt at once (the
prefill is cancelled, not run to the end for nobody). Pages that do not reach the decode worker
within ``kv_arrival_timeout_s`` of the prefill's answer (a cut or reset link between the two, a
transfer one side gave up on) fail the attempt with a retryable UNAVAILABLE blaming the prefill
worker, so failover resumes the request on another route instead of waiting out the caller's
deadline. Every exit path cancels the attempt's worker calls and releases its workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
import structlog

from core.sampling import SamplingParams
from gateway.errors import UpstreamError
from gateway.migration import hand_over
from gateway.router import Route, Router
from gateway.worker_calls import MigrationOffered, TokenEvent
from gateway.worker_clients import DecodeClient, PrefillClient
from server_runtime.metrics import GatewayMetrics

log = structlog.get_logger(__name__)

T = TypeVar("T")


class Deadline:
    """The caller's deadline, turned into the timeout each hop gets."""

    def __init__(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        self._at = None if timeout is None else loop.time() + timeout

    def remaining(self) -> float | None:
        if self._at is None:
            return None
        left = self._at - asyncio.get_running_loop().time()
        if left <= 0:
            raise UpstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        return left


def _within(timeout_s: float, deadline: Deadline) -> float | None:
    """``timeout_s`` (0: none), cut to what is left of the caller's deadline."""
    left = deadline.remaining()
    if not timeout_s:
        return left
    return timeout_s if left is None else min(timeout_s, left)


async def _cancelled(task: asyncio.Future[T]) -> None:
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _unless_failed(call: Awaitable[T], watched: asyncio.Future[None]) -> T:
    """``await call``, unless ``watched`` fails first: then ``call`` is cancelled and the
    failure raised."""
    task = asyncio.ensure_future(call)
    try:
        either: set[asyncio.Future[Any]] = {task, watched}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and watched.done() and watched.exception() is not None:
            watched.result()  # raises it
        return await task
    finally:
        await _cancelled(task)


async def run_attempt(
    router: Router,
    request_id: str,
    prompt: list[int],
    sampling: SamplingParams,
    route: Route,
    deadline: Deadline,
    *,
    kv_arrival_timeout_s: float,
    resumed_tokens: int = 0,
    on_cached: Callable[[Route], None] | None = None,
    metrics: GatewayMetrics | None = None,
) -> AsyncGenerator[TokenEvent, None]:
    """The attempt's events; raises UpstreamError naming the worker that failed. A decode
    worker that drains mid-stream hands the sequence over (:mod:`gateway.migration`). Once the
    decode stream's first token is out, the prompt's full blocks are in the prefix caches of
    every worker of the route (the decode worker registered them on computing or receiving
    them): ``on_cached(route)`` is called then (or when the prefill's first token ends the
    request)."""
    decode, prefill = route.decode, route.prefill
    decode_client = cast(DecodeClient, decode.client)  # the decode tier holds DecodeClients
    timeout = deadline.remaining()
    decode.assign()
    stream = decode_client.open(
        request_id,
        prompt,
        sampling,
        remote_prefill=prefill is not None,
        timeout=timeout,
        resumed_tokens=resumed_tokens,
    )
    try:
        if prefill is not None:
            ticket = await stream.ticket()
            arrival = asyncio.ensure_future(stream.arrival())  # watched from now on
            try:
                prefill.assign()
                call = cast(PrefillClient, prefill.client).prefill(
                    request_id,
                    prompt,
                    sampling,
                    ticket,
                    timeout=deadline.remaining(),
                    resumed_tokens=resumed_tokens,
                )
                try:
                    first = await _unless_failed(call, arrival)
                finally:
                    await router.registry.prefill.release(prefill)
                answered_at = asyncio.get_running_loop().time()
                first_lps = () if first.first_logprob is None else (first.first_logprob,)
                first_event = TokenEvent(
                    (first.first_token_id,), first.finish_reason, first_lps, first.cached_tokens
                )
                if first.finish_reason is not None and on_cached is not None:
                    on_cached(route)  # the prefill worker's cache holds it, at least
                yield first_event
                if first.finish_reason is not None:
                    return
                limit = _within(kv_arrival_timeout_s, deadline)
                if limit is not None:
                    limit = max(0.0, limit - (asyncio.get_running_loop().time() - answered_at))
                await asyncio.wait({arrival}, timeout=limit)
                if not arrival.done():
                    deadline.remaining()  # the caller's deadline, if that is what ran out
                    raise UpstreamError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"the KV pages of prefill worker {prefill.address} did not reach "
                        f"decode worker {decode.address} within {kv_arrival_timeout_s:g} s of "
                        "its answer",
                        tier="prefill",
                        address=prefill.address,
                        retryable=True,
                    )
                arrival.result()  # raises if the decode stream failed instead
            finally:
                await _cancelled(arrival)
        produced = [] if prefill is None else [first.first_token_id]
        try:
            async for event in stream.events():
                if on_cached is not None:
                    on_cached(route)  # before the yield: the consumer may stop at this event
                    on_cached = None
                if prefill is not None and event.cached_tokens:
                    event = dataclasses.replace(event, cached_tokens=0)  # the prefill's counts
                produced.extend(event.token_ids)
                yield event
        except MigrationOffered as offer:  # the decode worker drains: move the sequence on
            if not produced:
                raise _unavailable_after_offer(decode.address) from offer
            moved = hand_over(
                router,
                decode,
                stream,
                offer,
                request_id,
                prompt + produced,
                len(prompt),
                sampling,
                resumed_tokens,
                deadline,
                kv_arrival_timeout_s,
                metrics,
            )
            async with contextlib.aclosing(moved):
                async for event in moved:
                    yield event
    finally:
        stream.cancel()
        await router.registry.decode.release(decode)


def _unavailable_after_offer(address: str) -> UpstreamError:
    return UpstreamError(
        grpc.StatusCode.UNAVAILABLE,
        f"decode worker {address} drains and stopped the stream before its first token",
        tier="decode",
        address=address,
        retryable=True,
    )
