"""The decode worker in domain terms: reserve blocks, receive pages, batch, stream tokens.

The KV receiver writes pages only into a reservation's ``writable`` blocks and reports each
transfer's end to the engine's import connector (an :class:`ImportQueue`), which the engine
drains before each step. :meth:`DecodeWorker.release` cancels the transfer before the blocks are
freed, so no page lands in blocks that were given back. :meth:`DecodeWorker.arrival` resolves
on the event loop once a reservation's pages are all in (the gateway is told, see the servicer).

Migration (a draining worker's sequences move on with their KV): :meth:`DecodeWorker.park_all`
stops every decoding sequence; :meth:`DecodeWorker.migrate` pushes one's pages to the worker
whose ticket the gateway brings, through this worker's own :class:`KVSender` (the same
authenticated, integrity-checked transfer layer as prefill's), and frees its blocks only once
that worker acknowledged them; :meth:`DecodeWorker.keep` lets it finish here instead.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import structlog

from core.errors import EngineStoppedError
from core.pool_stats import PoolStats
from core.sampling import SamplingParams
from core.ticket import TransferTicket, check_ticket
from engine.async_engine import AsyncEngine, RequestHandle
from engine.config import EngineConfig
from engine.kv_connector import ImportQueue
from engine.model_loader import ModelSpec
from kvtransfer.config import TransferConfig, check_backend_device, fingerprint_for
from kvtransfer.receiver import KVReceiver
from kvtransfer.send_budget import TransferSpec
from kvtransfer.sender import KVSender

log = structlog.get_logger(__name__)


class NotParkedError(EngineStoppedError):
    """Migrate named no parked sequence here (it ended, or was never offered)."""


class MigrationFailedError(EngineStoppedError):
    """The sequence's pages did not reach the target (UNAVAILABLE: resume it elsewhere)."""


@dataclass(frozen=True)
class DecodeConfig:
    engine: EngineConfig
    transfer: TransferConfig
    listen: str = "127.0.0.1:50071"
    kv_bind: str = "tcp://127.0.0.1:0"
    """ZeroMQ endpoint the KV receiver binds (tcp://host:port or ipc:///path)."""
    kv_advertise: str | None = None
    """Endpoint prefill workers connect to; the bound endpoint when unset."""
    kv_lease_s: float = 60.0
    """A reservation whose pages have not all arrived by then is freed."""
    migrate: bool = True
    """On SIGTERM, move running sequences to other decode workers (else they finish here)."""
    kv_stream_port: int = 0
    """Stream backend over tcp: the port its page listener takes on the advertised host (0: an
    ephemeral one, announced in each handshake; fix it where a NetworkPolicy names ports)."""


class DecodeWorker:
    def __init__(self, config: DecodeConfig, engine: AsyncEngine) -> None:
        self.config = config
        self.engine = engine
        self.spec: ModelSpec = engine.spec
        kv = engine.kv_store()
        check_backend_device(config.transfer.backend, kv.device)
        self.fingerprint = fingerprint_for(engine.spec, kv, config.transfer)
        self.imports = ImportQueue()
        engine.set_import_connector(self.imports)
        self.receiver = KVReceiver(
            config.kv_bind,
            kv,
            self.fingerprint,
            config.transfer.auth(),
            on_ready=self._on_ready,
            on_failed=self.imports.failed,
            pair_host=_host_of(config.kv_advertise or config.kv_bind),
            stream_port=config.kv_stream_port,
            group_timeout_s=config.transfer.handshake_timeout_s,
        )
        self._transfers: dict[str, bytes] = {}  # engine key -> transfer id
        # engine key -> the future set (on its loop) when its pages are in; added and popped on
        # the loop, read from the receiver's thread (dict operations are atomic)
        self._arrivals: dict[str, asyncio.Future[None]] = {}
        self.kv_endpoint = config.kv_advertise or config.kv_bind
        self.sender = KVSender(  # migration's: this worker's sequences to another's blocks
            self.fingerprint,
            config.transfer.auth(),
            ack_timeout_s=config.transfer.ack_timeout_s,
            handshake_timeout_s=config.transfer.handshake_timeout_s,
            max_queued_bytes=config.transfer.max_queued_bytes,
            on_sent=self._on_sent,
        )
        self._sent: dict[str, asyncio.Future[tuple[bool, str]]] = {}  # engine key -> its ack

    def start(self) -> None:
        bound = self.receiver.start()
        self.kv_endpoint = self.config.kv_advertise or bound
        self.sender.start()
        self.engine.start()

    def stop(self) -> None:
        self.receiver.stop()
        self.sender.stop()
        self.engine.stop()

    def park_all(self) -> None:
        """Draining: every decoding sequence stops after its tokens so far, to be migrated."""
        log.info("migration_drain_started")
        self.engine.park_all()

    def keep(self, key: str) -> None:
        """A parked sequence finishes here after all (no other worker could take it)."""
        if not self.engine.unpark(key):
            raise NotParkedError(f"no parked sequence {key!r} on this worker")

    async def migrate(self, key: str, ticket: TransferTicket) -> int:
        """Push parked sequence ``key``'s KV to ``ticket``'s worker, which reserved its tokens
        but the last; the last goes as the DONE frame's token. Returns the bytes sent once the
        target acknowledged them, then frees the blocks here (the target owns the sequence
        now). On failure the sequence stays parked (the gateway resumes it elsewhere and
        cancels its call, which frees it)."""
        try:  # (the blocks the target holds cached already are not copied)
            pages, last_token, computed = await asyncio.to_thread(
                self.engine.parked_pages, key, ticket.cached_blocks
            )
        except KeyError:
            raise NotParkedError(f"no parked sequence {key!r} on this worker") from None
        check_ticket(ticket, self.fingerprint, self.engine.blocks_for(computed))
        spec = TransferSpec(key, ticket.transfer_id, ticket.kv_endpoint, ticket.blocks_to_send)
        acked = asyncio.get_running_loop().create_future()
        self._sent[key] = acked
        try:
            self.sender.open(spec)
            await asyncio.to_thread(self.sender.send_pages, ticket.transfer_id, 0, pages)
            self.sender.finish(ticket.transfer_id, last_token)
            ok, message = await acked
        except BaseException:
            self.sender.abort(ticket.transfer_id, "migration cancelled or failed")
            raise
        finally:
            self._sent.pop(key, None)
        if not ok:
            raise MigrationFailedError(f"migration to {ticket.kv_endpoint} failed: {message}")
        self.engine.abort(key)  # the target acknowledged every page: the blocks go back
        nbytes = pages.numel() * pages.element_size()
        log.info("sequence_migrated", key=key, target=ticket.kv_endpoint, bytes=nbytes)
        return nbytes

    def _on_sent(self, key: str, ok: bool, message: str) -> None:
        """The sender's thread: a migration's transfer was acknowledged, or failed."""
        acked = self._sent.get(key)
        if acked is not None:
            acked.get_loop().call_soon_threadsafe(_settle, acked, (ok, message))

    def generate_local(
        self,
        request_id: str,
        prompt: list[int],
        sampling: SamplingParams,
        resumed_tokens: int = 0,
    ) -> RequestHandle:
        """Colocated: compute the prompt here and stream every token."""
        seq = self.engine.new_sequence(request_id, prompt, sampling, resumed_tokens)
        return self.engine.submit(seq)

    def reserve(
        self,
        request_id: str,
        prompt: list[int],
        sampling: SamplingParams,
        lease_s: float,
        resumed_tokens: int = 0,
    ) -> tuple[RequestHandle, TransferTicket]:
        """Reserve blocks for a prompt a prefill worker computes; the ticket says where to push
        its pages. Raises OutOfBlocksError. The caller must :meth:`release` the handle."""
        seq = self.engine.new_sequence(request_id, prompt, sampling, resumed_tokens)
        handle, reservation = self.engine.reserve_import(seq)
        transfer_id = os.urandom(16)
        lease_s = min(lease_s, self.config.kv_lease_s)
        self._transfers[handle.key] = transfer_id
        self._arrivals[handle.key] = asyncio.get_running_loop().create_future()
        # the shared prefix blocks are not written: only the rest may receive pages
        self.receiver.expect(transfer_id, handle.key, list(reservation.writable), lease_s)
        ticket = TransferTicket(
            transfer_id=transfer_id,
            kv_endpoint=self.kv_endpoint,
            block_ids=reservation.block_ids,
            lease_s=lease_s,
            fingerprint=self.fingerprint,
            cached_blocks=reservation.cached_blocks,
        )
        return handle, ticket

    def release(self, handle: RequestHandle) -> None:
        """End a request on every exit path: stop its transfer first, then free its blocks."""
        arrival = self._arrivals.pop(handle.key, None)
        if arrival is not None:
            arrival.cancel()
        transfer_id = self._transfers.pop(handle.key, None)
        if transfer_id is not None:
            self.receiver.cancel(transfer_id)  # after this no page can land in its blocks
        handle.close()

    def arrival(self, handle: RequestHandle) -> asyncio.Future[None]:
        """Done once every page of ``handle``'s reservation is in (cancelled on release)."""
        return self._arrivals[handle.key]

    def _on_ready(self, key: str, first_token_id: int) -> None:
        """The receiver's thread: a reservation's pages are all in."""
        self.imports.ready(key, first_token_id)
        arrival = self._arrivals.get(key)
        if arrival is not None:
            arrival.get_loop().call_soon_threadsafe(_resolve, arrival)

    def stats(self) -> PoolStats:
        return self.engine.stats()

    def pending_transfers(self) -> int:
        return self.receiver.pending()


def _settle(future: asyncio.Future[tuple[bool, str]], result: tuple[bool, str]) -> None:
    if not future.done():
        future.set_result(result)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _host_of(endpoint: str) -> str:
    """Host part of ``tcp://host:port`` (where the pair-group store listens); loopback else."""
    if endpoint.startswith("tcp://"):
        host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
        return "127.0.0.1" if host in ("", "*", "0.0.0.0") else host
    return "127.0.0.1"
