"""The decode side's leases: which reserved blocks each expected transfer may write, until when.

One lock guards them. Pages are written under it, except the stream backend's in-place reads,
which must not hold it while a socket read runs: :meth:`Reservations.fill` marks the transfer as
being written for one short read at a time and re-checks before each read that the transfer is
still expected, and :meth:`Reservations.cancel` waits out a read already into the transfer's
blocks. So once ``cancel`` returns, no byte of that transfer lands in its blocks again, and the
caller may free them.

A reservation belongs to the first sender whose frame for it was applied (:meth:`Reservation.
claim`): frames for it from any other peer are dropped and never end it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvtransfer import wire
from kvtransfer.datapath import PairLinkError, StreamLink

READ_CHUNK_BYTES = 256 << 10
"""An in-place read takes at most this much at a time and hands it to ``on_read`` at once,
while it is still in the L2 cache (the tag is computed there; on a 2-core machine hashing each
layer again from memory cost a third of the stream's goodput, hashing it hot costs ~nothing)."""


@dataclass
class Reservation:
    request_id: str
    block_ids: frozenset[int]
    deadline: float
    started: float | None = None  # first verified page (or DONE/ABORT) seen
    writer: str | None = None  # the sender it belongs to, once one wrote (receive_peers.Peer)
    written: dict[int, set[int]] = field(default_factory=dict)  # layer -> blocks written

    def claim(self, sender: str) -> bool:
        """Whether ``sender`` may write this reservation: the first to ask may, and then it
        alone (under the reservations' lock)."""
        if self.writer is None:
            self.writer = sender
        return self.writer == sender

    def complete(self, num_layers: int) -> bool:
        """Every reserved block has been written for every layer."""
        return all(self.written.get(layer, set()) >= self.block_ids for layer in range(num_layers))

    def mark(self, header: wire.PageHeader) -> None:
        for layer in range(header.layer_start, header.layer_end):
            self.written.setdefault(layer, set()).update(header.block_ids)

    def overlaps_written(self, header: wire.PageHeader) -> bool:
        """Some (layer, block) of this page has already been written by a verified page: a
        copy of it must then be verified before it lands, never after (a forged or corrupted
        copy landing first would leave blocks that count as written holding bytes that did
        not verify, or, refused, undo a good transfer)."""
        blocks = set(header.block_ids)
        return any(
            not blocks.isdisjoint(self.written.get(layer, ()))
            for layer in range(header.layer_start, header.layer_end)
        )


class Reservations:
    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.by_id: dict[bytes, Reservation] = {}  # read and changed under ``lock`` only
        self._writing: bytes | None = None  # transfer whose blocks an in-place read is filling

    def expect(
        self, transfer_id: bytes, request_id: str, block_ids: list[int], lease_s: float
    ) -> None:
        with self.lock:
            self.by_id[transfer_id] = Reservation(
                request_id, frozenset(block_ids), time.monotonic() + lease_s
            )

    def cancel(self, transfer_id: bytes) -> bool:
        """Forget a transfer; returns once no read can write its blocks any more."""
        return self.take(transfer_id) is not None

    def take(self, transfer_id: bytes) -> Reservation | None:
        """Forget a transfer as :meth:`cancel` does, returning its reservation (None if it was
        not expected)."""
        with self.lock:
            reservation = self.by_id.pop(transfer_id, None)
            while self._writing == transfer_id:  # an in-place read: one read slice at most
                self.lock.wait()
            return reservation

    def pending(self) -> int:
        with self.lock:
            return len(self.by_id)

    def expects(self, transfer_id: bytes) -> bool:
        with self.lock:
            return transfer_id in self.by_id

    def pop_expired(self, now: float) -> list[Reservation]:
        with self.lock:
            expired = [tid for tid, r in self.by_id.items() if r.deadline <= now]
            return [self.by_id.pop(tid) for tid in expired]

    def fill(
        self,
        link: StreamLink,
        transfer_id: bytes,
        reservation: Reservation,
        views: list[memoryview],
        nbytes: int,
        on_read: Callable[[memoryview], None],
    ) -> bool:
        """Read a ``nbytes`` payload from ``link`` into ``views`` (pool memory of the
        reservation's blocks), at most :data:`READ_CHUNK_BYTES` at a time, while the transfer
        still owns them, passing each piece to ``on_read`` as it lands (a cancel waits for
        both); once the transfer does
        not own them (cancelled, expired), the rest of the payload is read and dropped.
        Returns whether every byte landed. Raises :class:`PairLinkError` if the link breaks or
        stalls."""
        left = nbytes
        for view in views:
            filled, last = 0, time.monotonic()
            while filled < len(view):
                with self.lock:
                    owned = self.by_id.get(transfer_id) is reservation
                    if owned:
                        self._writing = transfer_id
                if not owned:
                    link.discard(left)
                    return False
                try:  # on_read may write too (decrypt in place): while the blocks are ours
                    count = link.read_some(view[filled : filled + READ_CHUNK_BYTES])
                    if count:
                        on_read(view[filled : filled + count])
                finally:
                    with self.lock:
                        self._writing = None
                        self.lock.notify_all()
                filled += count
                left -= count
                now = time.monotonic()
                if count:
                    last = now
                elif now - last > link.timeout_s:
                    raise PairLinkError(f"payload stream: no data for {link.timeout_s:.0f}s")
        return left == 0
