"""Moving a draining decode worker's stream to another decode worker, KV and all.

When a decode worker drains (SIGTERM, a scale-in) it stops each decoding sequence after the
tokens it has streamed and says ``migrating`` on the stream (:class:`MigrationOffered`). The
gateway keeps the client's call open and::

    gateway --Decode.Generate(REMOTE, tokens but the last)--> target: reserves, answers a ticket
    gateway --Decode.Migrate(key, ticket)-------------------> source: pushes every page, the
                                                               last token in the DONE frame;
                                                               answers once the target acked
    gateway <--kv_arrived------------------------------------ target
    gateway <--the next tokens------------------------------- target: decodes on

then cancels the source's call (its blocks are already free). The target computes nothing the
source had: it receives the KV of every position, the sequence's tokens and its sampling state
(a seeded draw depends on the seed and the position only; penalties see the earlier tokens as
output through ``resumed_tokens``), so the stream continues from the next token with no gap and
no duplicate. If no other decode worker can take it, ``Migrate`` without a ticket lets it finish
where it is. If the move fails (either worker dies, the pages do not arrive) the attempt fails
retryably and the request resumes the usual way, by re-prefill elsewhere, still token-exact.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, cast

import grpc
import structlog

from core.sampling import SamplingParams
from gateway.errors import UpstreamError
from gateway.registry import WorkerEntry
from gateway.router import Router
from gateway.worker_calls import DecodeStream, MigrationOffered, TokenEvent
from gateway.worker_clients import DecodeClient
from server_runtime.metrics import GatewayMetrics

if TYPE_CHECKING:
    from gateway.attempt import Deadline

log = structlog.get_logger(__name__)


async def hand_over(
    router: Router,
    source: WorkerEntry,
    source_stream: DecodeStream,
    offer: MigrationOffered,
    request_id: str,
    tokens: list[int],
    prompt_len: int,
    sampling: SamplingParams,
    resumed_tokens: int,
    deadline: Deadline,
    kv_arrival_timeout_s: float,
    metrics: GatewayMetrics | None = None,
) -> AsyncGenerator[TokenEvent, None]:
    """The stream's events from where ``source`` stopped: through a target that took the
    sequence over, or ``source`` again when none can. ``tokens``: the sequence's every token
    (the attempt's prompt, ``prompt_len`` long, then what it produced); ``sampling`` and
    ``resumed_tokens``: the attempt's."""
    started = time.monotonic()
    source_client = cast(DecodeClient, source.client)
    target = router.migration_target(tokens[:-1], source.address)
    if target is None:
        log.info("migration_kept", source=source.address, reason="no other decode worker")
        await source_client.migrate(request_id, offer.key, None, deadline.remaining())
        if metrics is not None:
            metrics.migration("kept")
        async for event in source_stream.events():
            yield event
        return
    target.assign()
    moved = len(tokens) - 1 - prompt_len  # produced tokens the target's prompt holds
    stream = cast(DecodeClient, target.client).open(
        request_id,
        tokens[:-1],
        dataclasses.replace(
            sampling,
            max_tokens=sampling.max_tokens - moved,
            min_tokens=max(0, sampling.min_tokens - moved),
        ),
        remote_prefill=True,
        timeout=deadline.remaining(),
        resumed_tokens=resumed_tokens + moved,
    )
    try:
        try:  # a wedged worker must not hold the stream: the whole move has a time limit
            async with asyncio.timeout(kv_arrival_timeout_s):
                ticket = await stream.ticket()
                nbytes = await source_client.migrate(
                    request_id, offer.key, ticket, deadline.remaining()
                )
                await stream.arrival()
        except (UpstreamError, TimeoutError) as exc:
            if metrics is not None:
                metrics.migration("failed")
            failed = (
                exc.address if isinstance(exc, UpstreamError) and exc.address else source.address
            )
            why = str(exc) or f"no answer within {kv_arrival_timeout_s:g} s"
            log.warning("migration_failed", source=source.address, target=target.address, error=why)
            raise UpstreamError(
                grpc.StatusCode.UNAVAILABLE,
                f"moving the stream from draining decode worker {source.address} to "
                f"{target.address} failed: {why}",
                tier="decode",
                address=failed,
                retryable=True,
            ) from exc
        source_stream.cancel()  # the source freed the sequence once the target acknowledged
        first = True
        async for event in stream.events():
            if first:
                first = False
                pause = time.monotonic() - started
                if metrics is not None:
                    metrics.migration("migrated")
                    metrics.migration_pause.observe(pause)
                    metrics.migration_bytes.inc(nbytes)
                log.info(
                    "stream_migrated",
                    source=source.address,
                    target=target.address,
                    bytes=nbytes,
                    tokens=len(tokens),
                    pause_ms=round(pause * 1000, 1),
                )
            yield event
    finally:
        stream.cancel()
        await router.registry.decode.release(target)
