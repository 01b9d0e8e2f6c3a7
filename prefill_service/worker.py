"""The prefill worker in domain terms: compute prompts in batches, push pages, answer fast.

:class:`SenderExport` is the engine's export connector over :class:`KVSender`. Each prompt's
transfer is opened before the prompt reaches the engine and ended exactly once by
:meth:`PrefillWorker.prefill` (``finish`` when a decode worker continues it, ``abort`` on every
other exit). The worker talks to the engine only through :class:`AsyncEngine`'s public methods.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog
import torch

from core.errors import EngineError, InvalidRequestError
from core.pool_stats import PoolStats
from core.sampling import FinishReason, SamplingParams, TokenLogprob
from core.ticket import TransferTicket, check_ticket
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.kv_connector import ExportMode, LayerPages
from kvtransfer.config import Streaming, TransferConfig, check_backend_device, fingerprint_for
from kvtransfer.sender import KVSender, TransferBackpressureError, TransferSpec
from server_runtime.metrics import WorkerMetrics

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class PrefillConfig:
    engine: EngineConfig
    transfer: TransferConfig
    listen: str = "127.0.0.1:50061"


@dataclass(frozen=True)
class PrefillResult:
    first_token_id: int
    finish_reason: FinishReason | None  # set when the first token already ends the request
    prefill_ns: int  # arrival to first token on this worker (queue + compute)
    first_logprob: TokenLogprob | None = None  # when the request asked for logprobs
    cached_tokens: int = 0  # prompt tokens taken from this worker's prefix cache


class SenderExport:
    """The export connector: ships exporting prompts' pages through the KV sender, skipping
    the leading blocks the decode worker already holds (its prefix cache)."""

    def __init__(self, sender: KVSender, mode: ExportMode) -> None:
        self.sender = sender
        self._mode = mode
        # engine key -> (transfer in flight, leading prompt blocks not sent)
        self._transfers: dict[str, tuple[TransferSpec, int]] = {}

    @property
    def mode(self) -> ExportMode:
        return self._mode

    def open(self, key: str, transfer: TransferSpec, skip: int) -> None:
        self.sender.open(transfer)
        self._transfers[key] = (transfer, skip)

    def forget(self, key: str) -> None:
        """The engine is done with the prompt: no more layers will come for it."""
        self._transfers.pop(key, None)

    def save_layer(self, layer: LayerPages) -> None:
        """Engine thread, mid-forward: this layer's KV of a prompt is ready."""
        entry = self._transfers.get(layer.request_id)
        if entry is not None:
            transfer, skip = entry  # the decode worker holds the first ``skip`` blocks already
            self.sender.send_pages(transfer.transfer_id, layer.layer, layer.pages[:, :, skip:])

    def send_all(self, transfer: TransferSpec, pages: torch.Tensor) -> None:
        """After the prefill (off the engine thread): every layer at once."""
        try:
            self.sender.send_pages(transfer.transfer_id, 0, pages)
        except TransferBackpressureError as exc:
            log.warning("kv_backpressure_abort", request_id=transfer.request_id, error=str(exc))


class PrefillWorker:
    def __init__(
        self, config: PrefillConfig, engine: AsyncEngine, metrics: WorkerMetrics | None = None
    ) -> None:
        self.config = config
        self.engine = engine
        self.metrics = metrics
        kv = engine.kv_store()
        check_backend_device(config.transfer.backend, kv.device)
        self.fingerprint = fingerprint_for(engine.spec, kv, config.transfer)
        self.sender = KVSender(
            self.fingerprint,
            config.transfer.auth(),
            ack_timeout_s=config.transfer.ack_timeout_s,
            handshake_timeout_s=config.transfer.handshake_timeout_s,
            max_queued_bytes=config.transfer.max_queued_bytes,
        )
        layerwise = config.transfer.streaming is Streaming.LAYERWISE
        self.export = SenderExport(
            self.sender, ExportMode.LAYERWISE if layerwise else ExportMode.AFTER_PREFILL
        )
        engine.set_export_connector(self.export)

    def start(self) -> None:
        self.sender.start()
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()
        self.sender.stop()

    async def prefill(
        self,
        request_id: str,
        prompt: list[int],
        sampling: SamplingParams,
        ticket: TransferTicket,
        resumed_tokens: int = 0,
    ) -> PrefillResult:
        """Compute the prompt while its pages stream out; answer with the first token.

        Cancelling the awaiting task aborts the prompt in the engine, frees its blocks, and
        aborts the transfer (the decode worker frees its reservation at once)."""
        num_blocks = self.engine.blocks_for(len(prompt))
        check_ticket(ticket, self.fingerprint, num_blocks)
        seq = self.engine.new_sequence(request_id, prompt, sampling, resumed_tokens)
        transfer = TransferSpec(
            request_id, ticket.transfer_id, ticket.kv_endpoint, ticket.blocks_to_send
        )
        skip = ticket.cached_blocks
        start = time.monotonic_ns()
        self.export.open(seq.request_id, transfer, skip)
        try:
            handle = self.engine.submit(seq, export_kv=True)
            try:
                out = await handle.next_output()
            finally:
                handle.close()
        except BaseException:
            self.sender.abort(transfer.transfer_id, "prefill cancelled or failed")
            raise
        finally:
            self.export.forget(seq.request_id)
        done = time.monotonic_ns()
        if self.metrics is not None and out.timings is not None:
            self.metrics.observe(out.timings, len(prompt), len(out.token_ids))
        if out.finish_reason is FinishReason.ERROR:
            self.sender.abort(transfer.transfer_id, out.error or "prefill failed")
            if out.invalid_request:  # e.g. its grammar: INVALID_ARGUMENT, not retried elsewhere
                raise InvalidRequestError(out.error or "invalid request")
            raise EngineError(out.error or "prefill failed")
        first = out.token_ids[0]
        if out.finish_reason is not None:  # nothing left to decode: release the reservation
            self.sender.abort(transfer.transfer_id, "request finished at its first token")
        else:
            if out.pages is not None:  # send-after-prefill mode
                await asyncio.to_thread(self.export.send_all, transfer, out.pages[:, :, skip:])
            self.sender.finish(transfer.transfer_id, first)
        first_lp = out.logprobs[0] if out.logprobs else None
        return PrefillResult(
            first,
            out.finish_reason,
            prefill_ns=done - start,
            first_logprob=first_lp,
            cached_tokens=out.num_cached_tokens,
        )

    def stats(self) -> PoolStats:
        return self.engine.stats()

    def pending_transfers(self) -> int:
        return self.sender.pending()
