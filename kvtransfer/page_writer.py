"""What a decoded frame does to the decode worker's KV pool and its reservations.

The receiver (``kvtransfer.receiver``) owns sockets and peers; this module owns the rules: a
page lands only inside the reservation of a transfer currently expected, with the receiver's
geometry, and counts (is marked written) only once its tag has verified; DONE completes a
transfer only when every reserved block of every layer has been written; a frame from a sender
other than the one the reservation belongs to (``Reservation.claim``) changes nothing.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import TypeAlias

import structlog
import torch

from engine.kv_cache import KVCache
from kvtransfer import wire
from kvtransfer.datapath import StreamLink
from kvtransfer.metrics import TransferStats
from kvtransfer.reservations import READ_CHUNK_BYTES, Reservation, Reservations

log = structlog.get_logger(__name__)


@dataclass(frozen=True, eq=False)
class Completed:
    """DONE arrived with every reserved block of every layer written."""

    reservation: Reservation
    first_token_id: int


@dataclass(frozen=True, eq=False)
class Failed:
    """The transfer ended without its pages; ``reason`` leads with a ``label:`` for metrics."""

    reservation: Reservation
    reason: str


Outcome: TypeAlias = Completed | Failed
"""How a transfer ended (it is no longer expected)."""


class PageWriter:
    def __init__(
        self, kv: KVCache, reservations: Reservations, auth: wire.FrameAuth, stats: TransferStats
    ) -> None:
        self.kv = kv
        self.reservations = reservations
        self.auth = auth
        self.stats = stats

    def refuse(self, exc: wire.MalformedFrameError) -> None:
        """Count (and log) a frame dropped for its tag or its framing."""
        unauthenticated = isinstance(exc, wire.UnauthenticatedFrameError)
        self.stats.drop("unauthenticated" if unauthenticated else "malformed")
        log.warning("kv_frame_dropped", reason=str(exc))

    def verified(self, frame: bytes | memoryview, payload: wire.Payload | None) -> bool:
        """Whether a PAGE decoded without its payload verifies with it, whole; a page that
        does not is refused (counted and logged)."""
        try:
            wire.verify_page(frame, self.auth, payload)
        except wire.MalformedFrameError as exc:
            self.refuse(exc)
            return False
        return True

    def judge_whole(
        self, frame: memoryview, payload: memoryview | None, exc: wire.MalformedFrameError
    ) -> wire.MalformedFrameError:
        """Why to refuse an in-band frame whose body did not decode (its tag unchecked): the
        tag's verdict over the whole frame when that fails too (a forgery is unauthenticated,
        whatever its body says), else ``exc``."""
        try:
            wire.verify_page(frame, self.auth, payload)
        except wire.MalformedFrameError as verdict:
            return verdict
        return exc

    def apply(
        self,
        header: wire.Header,
        payload: torch.Tensor | memoryview | None,
        sender: str,
        check: wire.PayloadCheck | None = None,
    ) -> Outcome | None:
        """Apply one authenticated frame of a transfer from ``sender`` (a PAGE with ``check``
        is authenticated while it is copied into place). Returns how the transfer ended, if
        this frame ended it; raises :class:`UnknownTransferError` when no such transfer is
        expected (late, duplicate, expired or cancelled), :class:`ForeignWriterError` when it
        belongs to another sender, :class:`PageRefusedError` when the page's tag does not
        verify (it does not count; the transfer goes on)."""
        tid = header.transfer_id
        with self.reservations.lock:
            reservation = self.reservations.by_id.get(tid)
            if reservation is not None:
                if not reservation.claim(sender):
                    raise ForeignWriterError(reservation.request_id)
                return self._apply(reservation, header, payload, check)
        if check is not None and isinstance(payload, memoryview):
            _verify(check, payload)  # a frame that does not verify counts as such (off the lock)
        raise UnknownTransferError(tid)

    def _apply(
        self,
        reservation: Reservation,
        header: wire.Header,
        payload: torch.Tensor | memoryview | None,
        check: wire.PayloadCheck | None,
    ) -> Outcome | None:
        tid = header.transfer_id
        if reservation.started is None and check is None:  # a deferred page: once verified
            reservation.started = time.monotonic()
        # under the reservations' lock (the caller's)
        try:
            if isinstance(header, wire.PageHeader):
                if payload is None:
                    raise wire.MalformedFrameError("size: PAGE without its payload")
                self._write(reservation, header, payload, check)
                return None
            if isinstance(header, wire.DoneHeader):
                if header.num_layers != self.kv.num_layers:
                    raise wire.MalformedFrameError(
                        f"layers: DONE for {header.num_layers}, receiver has {self.kv.num_layers}"
                    )
                if not reservation.complete(self.kv.num_layers):
                    raise wire.MalformedFrameError(
                        "incomplete: DONE with layers missing (a reserved block has not arrived)"
                    )
                del self.reservations.by_id[tid]
                return Completed(reservation, header.first_token_id)
            if isinstance(header, wire.AbortHeader):
                raise wire.MalformedFrameError(f"aborted: sender aborted: {header.reason}")
            raise wire.MalformedFrameError("unexpected: ACK on the receiving side")
        except wire.MalformedFrameError as exc:
            del self.reservations.by_id[tid]
            return Failed(reservation, str(exc))

    def write_in_place(
        self,
        link: StreamLink,
        header: wire.PageHeader,
        frame: bytes,
        payload_len: int,
        sender: str,
    ) -> bool:
        """Read the payload that follows this header on ``link`` straight into its transfer's
        reserved blocks, then verify it with the header. A page that does not verify is
        dropped: its blocks held nothing verified and still count as unwritten (the transfer
        cannot finish unless a good copy follows). Returns False, having read nothing, when
        the page cannot land so (unknown transfer, another sender's, a page that does not fit
        its reservation, a payload size other than the header's, or blocks a verified page
        already wrote):
        the caller then reads it aside, verifies it whole and :meth:`apply` reports it."""
        if payload_len != header.payload_nbytes or self.kv.device.type != "cpu":
            return False
        tid = header.transfer_id
        with self.reservations.lock:
            reservation = self.reservations.by_id.get(tid)
            if reservation is None or not reservation.claim(sender):
                return False
            try:
                self.check(reservation, header)
            except wire.MalformedFrameError:
                return False
            if reservation.overlaps_written(header):
                return False  # verified before it may land over verified blocks
        views = self.kv.page_views(header.block_ids, header.layers)
        check = wire.payload_check(frame, self.auth)  # fed each piece as it lands
        if not self.reservations.fill(link, tid, reservation, views, payload_len, check.update):
            self.stats.drop("unknown_transfer")  # cancelled or expired while reading
            return True
        try:
            check.verify()
            verified = True
        except wire.MalformedFrameError as exc:
            self.refuse(exc)
            verified = False
        with self.reservations.lock:
            if self.reservations.by_id.get(tid) is not reservation:
                self.stats.drop("unknown_transfer")
            elif verified:
                self._count(reservation, header)
        return True

    def check(self, reservation: Reservation, header: wire.PageHeader) -> None:
        """Raise unless the page fits this pool and lands inside the reservation."""
        kv = self.kv
        geometry = (header.block_size, header.num_kv_heads, header.head_dim, header.dtype)
        mine = (kv.block_size, kv.num_kv_heads, kv.head_dim, kv.dtype)
        if geometry != mine:
            raise wire.MalformedFrameError(f"geometry: page {geometry} != receiver's {mine}")
        if header.layer_end > kv.num_layers:
            raise wire.MalformedFrameError(f"layers: {header.layer_end - 1} >= {kv.num_layers}")
        if not reservation.block_ids.issuperset(header.block_ids):
            raise wire.MalformedFrameError("blocks: page targets blocks outside the reservation")

    def _write(
        self,
        reservation: Reservation,
        header: wire.PageHeader,
        payload: torch.Tensor | memoryview,
        check: wire.PayloadCheck | None,
    ) -> None:
        if isinstance(payload, torch.Tensor):  # from a pair group: already shaped
            self.check(reservation, header)
            self.kv.scatter_pages(header.block_ids, payload, header.layers)
        else:
            try:
                self.check(reservation, header)
                wire.check_payload_size(header, payload)
            except wire.MalformedFrameError:
                if check is not None:  # a frame that does not verify is dropped, not blamed
                    _verify(check, payload)
                raise
            if check is not None and not reservation.overlaps_written(header):
                self._copy_verified(header, payload, check)
            else:
                if check is not None:  # verified before it may land over verified blocks
                    _verify(check, payload)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # read-only: we only read it
                    flat = torch.frombuffer(payload, dtype=torch.uint8)
                pages = flat.view(header.dtype).view(header.shape)
                self.kv.scatter_pages(header.block_ids, pages, header.layers)
        self._count(reservation, header)

    def _copy_verified(
        self, header: wire.PageHeader, payload: memoryview, check: wire.PayloadCheck
    ) -> None:
        """Copy an in-band payload into the reserved blocks a cache-sized piece at a time,
        hashing each piece right after it lands (one pass over the payload from memory, not
        two). A page that does not verify is refused; the blocks it scribbled on held nothing
        verified (see :meth:`Reservation.overlaps_written`), so they still count as unwritten."""
        source = payload.cast("B") if payload.format != "B" else payload
        offset = 0
        for view in self.kv.page_views(header.block_ids, header.layers):
            for start in range(0, len(view), READ_CHUNK_BYTES):
                piece = view[start : start + READ_CHUNK_BYTES]
                piece[:] = source[offset : offset + len(piece)]
                check.update(piece)
                offset += len(piece)
        _verify(check)

    def _count(self, reservation: Reservation, header: wire.PageHeader) -> None:
        if reservation.started is None:
            reservation.started = time.monotonic()
        reservation.mark(header)
        self.stats.pages += 1
        self.stats.bytes += header.payload_nbytes


def _verify(check: wire.PayloadCheck, payload: memoryview | None = None) -> None:
    """Verify ``check`` (fed ``payload`` whole first, when given); a failure refuses the page."""
    if payload is not None:
        check.update(payload)
    try:
        check.verify()
    except wire.MalformedFrameError as exc:
        raise PageRefusedError(exc) from exc


class PageRefusedError(Exception):
    """A page's tag did not verify once it was in place; ``cause`` says how."""

    def __init__(self, cause: wire.MalformedFrameError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class UnknownTransferError(LookupError):
    """A frame for a transfer this worker does not expect (any more)."""


class ForeignWriterError(LookupError):
    """A frame for a reservation that belongs to another sender (its request id in args)."""
