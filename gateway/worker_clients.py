"""Calls from the gateway to the worker tiers: domain values in, domain values out.

This is the gateway's proto boundary towards workers; RPC failures become :class:`UpstreamError`
with the status code the client should see.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from engine.sequence import FinishReason, SamplingParams
from gateway.errors import UpstreamError
from kvtransfer.ticket import TransferTicket
from pdserve.proto_convert import (
    FINISH_FROM_PROTO,
    sampling_to_proto,
    ticket_from_proto,
    ticket_to_proto,
)
from protos.pdserve.v1 import worker_pb2, worker_pb2_grpc

# Codes a worker may return that the client should see as they are; anything else means the
# tier failed, which the client sees as UNAVAILABLE.
_PASS_THROUGH = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 16 << 20),
]


@dataclass(frozen=True)
class TokenEvent:
    """New tokens for a request; ``finish_reason`` is set on the last event."""

    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None


@dataclass(frozen=True)
class WorkerStatus:
    tier: str
    total_blocks: int
    free_blocks: int
    running: int
    waiting: int
    pending_transfers: int
    pool_ok: bool


def upstream_error(tier: str, address: str, exc: grpc.aio.AioRpcError) -> UpstreamError:
    code = exc.code()
    message = f"{tier} worker {address}: {exc.details()}"
    return UpstreamError(code if code in _PASS_THROUGH else grpc.StatusCode.UNAVAILABLE, message)


class DecodeStream:
    """One open ``Decode.Generate`` call. :meth:`cancel` on every exit path."""

    def __init__(self, address: str, call: grpc.aio.UnaryStreamCall) -> None:
        self._address = address
        self._call = call

    async def ticket(self) -> TransferTicket:
        """The first message of a REMOTE-mode call: where the prefill worker pushes pages."""
        try:
            msg = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise upstream_error("decode", self._address, exc) from exc
        if msg is grpc.aio.EOF or not msg.HasField("ticket"):
            raise UpstreamError(
                grpc.StatusCode.UNAVAILABLE, f"decode worker {self._address} sent no ticket"
            )
        return ticket_from_proto(msg.ticket)

    async def events(self) -> AsyncIterator[TokenEvent]:
        try:
            while True:
                msg = await self._call.read()
                if msg is grpc.aio.EOF:
                    raise UpstreamError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"decode worker {self._address} ended the stream before finishing",
                    )
                chunk = msg.tokens
                finish = FINISH_FROM_PROTO[chunk.finish_reason]
                yield TokenEvent(tuple(chunk.token_ids), finish)
                if finish is not None:
                    return
        except grpc.aio.AioRpcError as exc:
            raise upstream_error("decode", self._address, exc) from exc

    def cancel(self) -> None:
        self._call.cancel()


class DecodeClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = worker_pb2_grpc.DecodeStub(self._channel)

    def open(
        self,
        request_id: str,
        prompt: list[int],
        sampling: SamplingParams,
        *,
        remote_prefill: bool,
        timeout: float | None,
    ) -> DecodeStream:
        request = worker_pb2.DecodeRequest(
            request_id=request_id,
            prompt_token_ids=prompt,
            sampling=sampling_to_proto(sampling),
            mode=worker_pb2.PREFILL_MODE_REMOTE
            if remote_prefill
            else worker_pb2.PREFILL_MODE_LOCAL,
        )
        return DecodeStream(self.address, self._stub.Generate(request, timeout=timeout))

    async def status(self, timeout: float = 5.0) -> WorkerStatus:
        return await _status(self._stub, "decode", self.address, timeout)

    async def close(self) -> None:
        await self._channel.close()


@dataclass(frozen=True)
class PrefillOutcome:
    first_token_id: int
    finish_reason: FinishReason | None


class PrefillClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = worker_pb2_grpc.PrefillStub(self._channel)

    async def prefill(
        self,
        request_id: str,
        prompt: list[int],
        sampling: SamplingParams,
        ticket: TransferTicket,
        timeout: float | None,
    ) -> PrefillOutcome:
        request = worker_pb2.PrefillRequest(
            request_id=request_id,
            prompt_token_ids=prompt,
            sampling=sampling_to_proto(sampling),
            ticket=ticket_to_proto(ticket),
        )
        try:
            reply = await self._stub.Prefill(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise upstream_error("prefill", self.address, exc) from exc
        return PrefillOutcome(reply.first_token_id, FINISH_FROM_PROTO[reply.finish_reason])

    async def status(self, timeout: float = 5.0) -> WorkerStatus:
        return await _status(self._stub, "prefill", self.address, timeout)

    async def close(self) -> None:
        await self._channel.close()


async def _status(
    stub: worker_pb2_grpc.DecodeStub | worker_pb2_grpc.PrefillStub,
    tier: str,
    address: str,
    timeout: float,
) -> WorkerStatus:
    try:
        msg = await stub.GetStatus(worker_pb2.StatusRequest(), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        raise upstream_error(tier, address, exc) from exc
    return WorkerStatus(
        tier=msg.tier,
        total_blocks=msg.total_blocks,
        free_blocks=msg.free_blocks,
        running=msg.running,
        waiting=msg.waiting,
        pending_transfers=msg.pending_transfers,
        pool_ok=msg.pool_ok,
    )
