"""The gateway's calls in flight on one worker: how their failures read, how they are abandoned,
and the open ``Decode.Generate`` stream.

Every failure of a worker call surfaces as :class:`UpstreamError` naming the worker, classified by
:func:`gateway.errors.worker_failure` (:func:`upstream_error`). :class:`OpenCalls` tracks one
client's calls so that a worker found hung can have them all abandoned: each then fails with a
retryable UNAVAILABLE (failover resumes it elsewhere), unless the task awaiting it is itself
being cancelled, which propagates as it is. :meth:`OpenCalls.settle` is the one place those rules
are applied to an awaited read or reply.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from core.rich_errors import retry_after_of
from core.sampling import FinishReason, TokenLogprob
from core.ticket import TransferTicket
from gateway.errors import UpstreamError, worker_failure
from protos.pdserve.v1 import worker_pb2
from server_runtime.proto_convert import FINISH_FROM_PROTO, logprobs_from_proto, ticket_from_proto

T = TypeVar("T")


@dataclass(frozen=True)
class TokenEvent:
    """New tokens for a request; ``finish_reason`` is set on the last event."""

    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token when the request asked
    cached_tokens: int = 0
    """Prompt tokens the worker that computed the prompt took from its prefix cache (on the
    event carrying the first token: the prefill worker's answer, or a LOCAL call's first
    chunk); 0 elsewhere."""


def upstream_error(tier: str, address: str, exc: grpc.aio.AioRpcError) -> UpstreamError:
    """A failed worker call (the worker's answer, or the gRPC library's own, local refusal) as
    the gateway reports it, classified by :func:`worker_failure`."""
    code = exc.code()
    retry_after = retry_after_of(exc) if code is grpc.StatusCode.RESOURCE_EXHAUSTED else None
    failure = worker_failure(code, retry_after is not None)
    return UpstreamError(
        failure.code,
        f"{tier} worker {address}: {exc.details()}",
        tier=tier,
        address=address,
        retryable=failure.retryable,
        retry_after_s=retry_after,
    )


def _unavailable(tier: str, address: str, message: str) -> UpstreamError:
    return UpstreamError(
        grpc.StatusCode.UNAVAILABLE, message, tier=tier, address=address, retryable=True
    )


class OpenCalls:
    """A client's calls in flight, so that :meth:`abandon` can cancel them all at once."""

    def __init__(self) -> None:
        self._calls: set[grpc.aio.Call] = set()
        self.abandoned: dict[grpc.aio.Call, str] = {}

    def add(self, call: grpc.aio.Call) -> None:
        self._calls.add(call)

    def discard(self, call: grpc.aio.Call) -> None:
        self._calls.discard(call)
        self.abandoned.pop(call, None)

    def abandon(self, reason: str) -> int:
        for call in self._calls:
            self.abandoned[call] = reason
            call.cancel()
        return len(self._calls)

    def failure(self, tier: str, address: str, call: grpc.aio.Call) -> UpstreamError | None:
        """The error for a call that ended cancelled: retryable UNAVAILABLE if the client
        abandoned it and the task itself is not being cancelled (then None: let it propagate)."""
        reason = self.abandoned.get(call)
        task = asyncio.current_task()
        if reason is None or (task is not None and task.cancelling()):
            return None
        return _unavailable(tier, address, f"{tier} worker {address}: call abandoned: {reason}")

    async def settle(
        self, tier: str, address: str, call: grpc.aio.Call, pending: Awaitable[T]
    ) -> T:
        """``await pending`` (a read of ``call``, or its reply), its failure as UpstreamError:
        the worker's status, or UNAVAILABLE if the call was abandoned."""
        try:
            return await pending
        except grpc.aio.AioRpcError as exc:
            raise self.failure(tier, address, call) or upstream_error(tier, address, exc) from exc
        except asyncio.CancelledError:
            if (error := self.failure(tier, address, call)) is None:
                raise
            raise error from None


class MigrationOffered(Exception):
    """The decode worker drains and stopped this stream's sequence (after the tokens already
    read): move it with ``DecodeClient.migrate(key, ...)`` while the stream stays open."""

    def __init__(self, key: str) -> None:
        super().__init__(f"sequence {key} offered for migration")
        self.key = key


class DecodeStream:
    """One open ``Decode.Generate`` call: REMOTE mode reads :meth:`ticket`, then
    :meth:`arrival`, then :meth:`events`; LOCAL mode only :meth:`events`. :meth:`cancel` on
    every exit path."""

    def __init__(
        self, address: str, call: grpc.aio.UnaryStreamCall, calls: OpenCalls | None = None
    ) -> None:
        self._address = address
        self._call = call
        self._calls = calls or OpenCalls()
        self._calls.add(call)
        self._unread: worker_pb2.DecodeResponse | None = None  # read ahead by arrival

    async def _read(self) -> worker_pb2.DecodeResponse:
        if self._unread is not None:
            msg, self._unread = self._unread, None
            return msg
        msg = await self._calls.settle("decode", self._address, self._call, self._call.read())
        if msg is grpc.aio.EOF:
            raise _unavailable(
                "decode",
                self._address,
                f"decode worker {self._address} ended the stream before finishing",
            )
        return msg

    async def ticket(self) -> TransferTicket:
        """The first message of a REMOTE-mode call: where the prefill worker pushes pages."""
        msg = await self._read()
        if not msg.HasField("ticket"):
            raise _unavailable(
                "decode", self._address, f"decode worker {self._address} sent no ticket"
            )
        return ticket_from_proto(msg.ticket)

    async def arrival(self) -> None:
        """Until the worker says the prefill's pages are in (a token instead, the request
        having ended, counts too and is kept for :meth:`events`); raises UpstreamError if the
        stream fails first (the decode worker died, say)."""
        msg = await self._read()
        if not msg.HasField("kv_arrived"):
            self._unread = msg

    async def events(self) -> AsyncIterator[TokenEvent]:
        """The stream's tokens; raises :class:`MigrationOffered` when the worker drains (the
        iteration may start again after a migration that kept the sequence there)."""
        while True:
            msg = await self._read()
            if msg.HasField("kv_arrived"):
                continue
            if msg.HasField("migrating"):
                raise MigrationOffered(msg.migrating.key)
            chunk = msg.tokens
            finish = FINISH_FROM_PROTO[chunk.finish_reason]
            yield TokenEvent(
                tuple(chunk.token_ids),
                finish,
                logprobs_from_proto(chunk.logprobs),
                chunk.cached_tokens,
            )
            if finish is not None:
                return

    def cancel(self) -> None:
        self._call.cancel()
        self._calls.discard(self._call)
