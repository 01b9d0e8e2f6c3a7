"""The decode worker in domain terms: reserve blocks, receive pages, batch, stream tokens.

The KV receiver writes pages only into a reservation's ``writable`` blocks and reports each
transfer's end to the engine's import connector (an :class:`ImportQueue`), which the engine
drains before each step. :meth:`DecodeWorker.release` cancels the transfer before the blocks are
freed, so no page lands in blocks that were given back. :meth:`DecodeWorker.arrival` resolves
on the event loop once a reservation's pages are all in (the gateway is told, see the servicer).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import structlog

from core.pool_stats import PoolStats
from core.sampling import SamplingParams
from core.ticket import TransferTicket
from engine.async_engine import AsyncEngine, RequestHandle
from engine.config import EngineConfig
from engine.kv_connector import ImportQueue
from engine.model_loader import ModelSpec
from kvtransfer.config import TransferConfig, check_backend_device, fingerprint_for
from kvtransfer.receiver import KVReceiver

log = structlog.get_logger(__name__)


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

    def start(self) -> None:
        bound = self.receiver.start()
        self.kv_endpoint = self.config.kv_advertise or bound
        self.engine.start()

    def stop(self) -> None:
        self.receiver.stop()
        self.engine.stop()

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


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _host_of(endpoint: str) -> str:
    """Host part of ``tcp://host:port`` (where the pair-group store listens); loopback else."""
    if endpoint.startswith("tcp://"):
        host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
        return "127.0.0.1" if host in ("", "*", "0.0.0.0") else host
    return "127.0.0.1"
