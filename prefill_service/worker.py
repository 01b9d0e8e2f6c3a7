"""The prefill worker in domain terms: compute prompts in batches, push pages, answer fast."""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine import PoolStats
from engine.errors import EngineError
from engine.sequence import FinishReason, SamplingParams
from kvtransfer.ticket import TransferTicket, check_compatible
from kvtransfer.zmq_transport import KVSender, OutgoingTransfer

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class PrefillConfig:
    engine: EngineConfig
    listen: str = "127.0.0.1:50061"
    checksum: bool = True
    ack_timeout_s: float = 30.0
    """Drop the outgoing pages when the decode worker has not acknowledged them by then."""


@dataclass(frozen=True)
class PrefillResult:
    first_token_id: int
    finish_reason: FinishReason | None  # set when the first token already ends the request
    prefill_ns: int  # arrival to first token on this worker (queue + compute)


class PrefillWorker:
    def __init__(self, config: PrefillConfig, engine: AsyncEngine) -> None:
        self.config = config
        self.engine = engine
        self.sender = KVSender(checksum=config.checksum, ack_timeout_s=config.ack_timeout_s)

    def start(self) -> None:
        self.sender.start()
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()
        self.sender.stop()

    async def prefill(
        self, request_id: str, prompt: list[int], sampling: SamplingParams, ticket: TransferTicket
    ) -> PrefillResult:
        """Compute the prompt, then push its pages without waiting for them to arrive.

        Cancelling the awaiting task aborts the prompt in the engine and frees its blocks."""
        kv = self.engine.engine.kv_cache
        check_compatible(ticket, kv, self.engine.engine.scheduler.blocks_for(len(prompt)))
        seq = self.engine.new_sequence(request_id, prompt, sampling)
        start = time.monotonic_ns()
        handle = self.engine.submit(seq, export_kv=True)
        try:
            out = await handle.next_output()
        finally:
            handle.close()
        done = time.monotonic_ns()
        if out.finish_reason is FinishReason.ERROR:
            raise EngineError(out.error or "prefill failed")
        assert out.pages is not None and out.token_ids
        first = out.token_ids[0]
        if out.finish_reason is None:  # the request continues on the decode worker
            self.sender.submit(
                OutgoingTransfer(
                    request_id=request_id,
                    transfer_id=ticket.transfer_id,
                    endpoint=ticket.kv_endpoint,
                    block_ids=ticket.block_ids,
                    pages=out.pages,
                    first_token_id=first,
                )
            )
        return PrefillResult(first, out.finish_reason, prefill_ns=done - start)

    def stats(self) -> PoolStats:
        return self.engine.stats()

    def pending_transfers(self) -> int:
        return self.sender.pending()
