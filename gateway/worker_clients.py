"""Calls from the gateway to the worker tiers: domain values in, domain values out.

This is the gateway's proto boundary towards workers (with :mod:`gateway.worker_calls`, which
says how a call's failure reads: :class:`UpstreamError` naming the worker). A client can abandon
its calls in flight (:meth:`_WorkerClient.abandon_calls`, for a worker that fell silent): each
then fails with a retryable UNAVAILABLE, so failover resumes it elsewhere. Every call carries the
request id as
``x-request-id`` metadata and the caller's remaining deadline; channels use TLS (mutual, with a
client certificate) when configured.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.keepalive import keepalive_options
from core.sampling import FinishReason, SamplingParams, TokenLogprob
from core.ticket import TransferTicket
from core.tls import TLSConfig, secure_channel
from gateway.errors import UpstreamError
from gateway.worker_calls import DecodeStream, OpenCalls, upstream_error
from protos.pdserve.v1 import worker_pb2, worker_pb2_grpc
from server_runtime.proto_convert import (
    FINISH_FROM_PROTO,
    logprob_from_proto,
    sampling_to_proto,
    ticket_to_proto,
)

CHANNEL_OPTIONS: list[tuple[str, object]] = [
    *keepalive_options(10.0, 5.0, reads_streams=True),  # it reads the workers' streams
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 << 20),
    # Reconnect fast once a worker (re)appears at a known address.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]

DECODE_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Decode"].full_name
PREFILL_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name


@dataclass(frozen=True)
class WorkerStatus:
    """One worker's load, as its ``GetStatus``/``WatchLoad`` reports it."""

    tier: str
    total_blocks: int
    free_blocks: int
    running: int
    waiting: int
    pending_transfers: int
    pool_ok: bool
    serving: bool = True
    block_size: int = 16
    awaiting_kv: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    max_num_seqs: int = 0
    requests_total: int = 0
    cached_prefixes: frozenset[bytes] = frozenset()
    """Anchor hashes of the prefixes the worker's prefix cache holds (core.prefix_summary)."""

    @property
    def full(self) -> bool:
        """At its admission limit: a new call would be refused with RESOURCE_EXHAUSTED."""
        return bool(self.max_in_flight) and self.in_flight >= self.max_in_flight


def _metadata(request_id: str) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", request_id),)


class _WorkerClient:
    """A channel to one worker, with the calls both tiers serve (status, load, health)."""

    tier = ""
    service = ""

    def __init__(self, address: str, tls: TLSConfig | None = None) -> None:
        self.address = address
        self._channel = secure_channel(address, tls, CHANNEL_OPTIONS)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._open = OpenCalls()

    def abandon_calls(self, reason: str) -> int:
        """Cancel every request call in flight (not the load and health streams); each fails
        with a retryable UNAVAILABLE naming ``reason``. Returns how many there were."""
        return self._open.abandon(reason)

    @property
    def _stub(self) -> worker_pb2_grpc.DecodeStub | worker_pb2_grpc.PrefillStub:
        raise NotImplementedError

    async def status(self, timeout: float = 5.0) -> WorkerStatus:
        try:
            msg = await self._stub.GetStatus(worker_pb2.StatusRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise upstream_error(self.tier, self.address, exc) from exc
        return status_from_proto(msg)

    async def watch_load(self, interval_ms: int) -> AsyncGenerator[WorkerStatus, None]:
        """The worker's load every ``interval_ms`` until the stream breaks (raises
        :class:`UpstreamError`) or the caller stops iterating."""
        call = self._stub.WatchLoad(worker_pb2.WatchLoadRequest(interval_ms=interval_ms))
        try:
            async for msg in call:
                yield status_from_proto(msg)
        except grpc.aio.AioRpcError as exc:
            raise upstream_error(self.tier, self.address, exc) from exc
        finally:
            call.cancel()
        raise _stream_ended(self.tier, self.address, "load")

    async def watch_health(self) -> AsyncIterator[bool]:
        """Whether the worker's service is SERVING, on every change (``grpc.health.v1`` Watch)."""
        call = self._health.Watch(health_pb2.HealthCheckRequest(service=self.service))
        try:
            async for msg in call:
                yield msg.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError as exc:
            raise upstream_error(self.tier, self.address, exc) from exc
        finally:
            call.cancel()
        raise _stream_ended(self.tier, self.address, "health")

    async def close(self) -> None:
        await self._channel.close()

    async def _unary(self, call: grpc.aio.UnaryUnaryCall) -> Any:
        """A request call's reply, the call tracked while it runs (:meth:`abandon_calls`)."""
        self._open.add(call)
        try:
            return await self._open.settle(self.tier, self.address, call, call)
        finally:
            self._open.discard(call)


def _stream_ended(tier: str, address: str, what: str) -> UpstreamError:
    return UpstreamError(
        grpc.StatusCode.UNAVAILABLE,
        f"{tier} worker {address} ended its {what} stream",
        tier=tier,
        address=address,
        retryable=True,
    )


class DecodeClient(_WorkerClient):
    tier = "decode"
    service = DECODE_SERVICE

    def __init__(self, address: str, tls: TLSConfig | None = None) -> None:
        super().__init__(address, tls)
        self._decode = worker_pb2_grpc.DecodeStub(self._channel)

    @property
    def _stub(self) -> worker_pb2_grpc.DecodeStub:
        return self._decode

    def open(
        self,
        request_id: str,
        prompt: list[int],
        sampling: SamplingParams,
        *,
        remote_prefill: bool,
        timeout: float | None,
        resumed_tokens: int = 0,
    ) -> DecodeStream:
        """``resumed_tokens``: trailing ``prompt`` tokens the request generated before a
        failover (output for the penalties)."""
        request = worker_pb2.DecodeRequest(
            request_id=request_id,
            prompt_token_ids=prompt,
            sampling=sampling_to_proto(sampling),
            resumed_tokens=resumed_tokens,
            mode=worker_pb2.PREFILL_MODE_REMOTE
            if remote_prefill
            else worker_pb2.PREFILL_MODE_LOCAL,
        )
        call = self._decode.Generate(request, timeout=timeout, metadata=_metadata(request_id))
        return DecodeStream(self.address, call, self._open)

    async def migrate(
        self, request_id: str, key: str, ticket: TransferTicket | None, timeout: float | None
    ) -> int:
        """Move the sequence this (draining) worker offered as ``key`` to ``ticket``'s worker;
        without a ticket it finishes here. Returns the KV bytes moved; raises UpstreamError."""
        request = worker_pb2.MigrateRequest(key=key)
        if ticket is not None:
            request.ticket.CopyFrom(ticket_to_proto(ticket))
        call = self._decode.Migrate(request, timeout=timeout, metadata=_metadata(request_id))
        reply = await self._unary(call)
        return int(reply.bytes)


@dataclass(frozen=True)
class PrefillOutcome:
    first_token_id: int
    finish_reason: FinishReason | None
    first_logprob: TokenLogprob | None = None  # when the request asked for logprobs
    cached_tokens: int = 0  # prompt tokens the prefill worker took from its prefix cache


class PrefillClient(_WorkerClient):
    tier = "prefill"
    service = PREFILL_SERVICE

    def __init__(self, address: str, tls: TLSConfig | None = None) -> None:
        super().__init__(address, tls)
        self._prefill = worker_pb2_grpc.PrefillStub(self._channel)

    @property
    def _stub(self) -> worker_pb2_grpc.PrefillStub:
        return self._prefill

    async def prefill(
        self,
        request_id: str,
        prompt: list[int],
        sampling: SamplingParams,
        ticket: TransferTicket,
        timeout: float | None,
        resumed_tokens: int = 0,
    ) -> PrefillOutcome:
        request = worker_pb2.PrefillRequest(
            request_id=request_id,
            prompt_token_ids=prompt,
            sampling=sampling_to_proto(sampling),
            ticket=ticket_to_proto(ticket),
            resumed_tokens=resumed_tokens,
        )
        call = self._prefill.Prefill(request, timeout=timeout, metadata=_metadata(request_id))
        reply = await self._unary(call)
        first_lp = (
            logprob_from_proto(reply.first_logprob) if reply.HasField("first_logprob") else None
        )
        return PrefillOutcome(
            reply.first_token_id,
            FINISH_FROM_PROTO[reply.finish_reason],
            first_lp,
            reply.cached_tokens,
        )


WorkerClient = DecodeClient | PrefillClient


def status_from_proto(msg: worker_pb2.WorkerStatus) -> WorkerStatus:
    return WorkerStatus(
        tier=msg.tier,
        total_blocks=msg.total_blocks,
        free_blocks=msg.free_blocks,
        running=msg.running,
        waiting=msg.waiting,
        pending_transfers=msg.pending_transfers,
        pool_ok=msg.pool_ok,
        serving=msg.serving,
        block_size=msg.block_size or 16,
        awaiting_kv=msg.awaiting_kv,
        in_flight=msg.in_flight,
        max_in_flight=msg.max_in_flight,
        max_num_seqs=msg.max_num_seqs,
        requests_total=msg.requests_total,
        cached_prefixes=frozenset(msg.cached_prefix_hashes),
    )
