"""The prefill workers a receiver has handshaken: their pair links and stream sockets.

A :class:`Peer` is in the table from its accepted HELLO until it is forgotten (a re-handshake on
its connection or, on a keyed channel, by its sender on a new one; a broken link); forgetting
closes its link (or withdraws the offer it has not joined yet) and stops polling its stream.
Each peer names its sender (``handshake.sender_of``). A pair link is joined off the receiving
thread (:meth:`PeerTable.admit`), so a peer that never joins stalls nobody: a stream is handed
over by the stream host's accepting thread (no thread waits for it, and one not joined within
the group timeout is withdrawn), a pair group is built by a rendezvous worker, whose first use
waits at most the group timeout. A joined link wakes the receiving thread (:attr:`PeerTable.
wake_fd` is on its poller). Only the receiving thread uses the table.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import structlog
import zmq

from core.ticket import Fingerprint
from kvtransfer.datapath import Backend, PairHost, PairLink, StreamHost, StreamLink

__all__ = ["Peer", "PeerTable"]

log = structlog.get_logger(__name__)


@dataclass(eq=False)
class Peer:
    identity: bytes  # its ZeroMQ routing id: where acks go
    fingerprint: Fingerprint
    sender: str  # who is behind it (see kvtransfer.handshake.sender_of): what reservations bind
    link: PairLink | None = None  # out-of-band backends only
    pending_link: Future[PairLink] | Future[StreamLink] | None = None  # until it joins
    join_deadline: float = 0.0  # a stream not joined by then is withdrawn


class PeerTable:
    """Handshaken peers by ZeroMQ identity and, for the stream backend, by stream socket fd
    (registered on the receiver's ``poller`` once joined)."""

    def __init__(
        self, backend: Backend, pairs: PairHost, poller: zmq.Poller, group_timeout_s: float
    ) -> None:
        self.backend = backend
        self._pairs = pairs
        self._poller = poller
        self._group_timeout_s = group_timeout_s
        self._rendezvous = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-rendezvous")
        self._by_identity: dict[bytes, Peer] = {}
        self._by_stream: dict[int, Peer] = {}
        self.wake_fd, wake_w = os.pipe()  # written when a link joins; closed by close()
        os.set_blocking(self.wake_fd, False)
        os.set_blocking(wake_w, False)
        self._wake_w: int | None = wake_w
        self._wake_lock = threading.Lock()  # a rendezvous worker may finish after close()
        poller.register(self.wake_fd, zmq.POLLIN)

    def get(self, identity: bytes) -> Peer | None:
        return self._by_identity.get(identity)

    def on_stream(self, fd: int) -> Peer | None:
        """The peer whose stream socket is ``fd`` (stream backend), if still known."""
        return self._by_stream.get(fd)

    def offer(self) -> dict[str, object] | None:
        """The rendezvous a WELCOME carries (out-of-band backends), else None."""
        return self._pairs.offer() if self.backend.out_of_band else None

    def admit(
        self,
        identity: bytes,
        fingerprint: Fingerprint,
        sender: str,
        offer: dict[str, object] | None,
        *,
        replaces: bool = False,
    ) -> None:
        """A peer whose HELLO was welcomed with ``offer`` (a re-handshake forgets the old one
        first). With ``replaces`` (a keyed channel: nobody else can send that sender's HELLO),
        a sender handshaking on a new connection has given up its old one (it keeps one per
        decode worker), so that peer is forgotten too."""
        for old in [p for p in self._by_identity.values() if p.sender == sender]:
            if replaces and old.identity != identity:
                self.forget(old, "its sender handshook on a new connection")
        peer = Peer(identity, fingerprint, sender)
        if offer is not None:  # joined off this thread: a peer that never joins stalls nobody
            pending: Future[PairLink] | Future[StreamLink]
            if isinstance(self._pairs, StreamHost):
                pending = self._pairs.claim(offer)
            else:
                pending = self._rendezvous.submit(self._pairs.accept, offer)
            pending.add_done_callback(self._wake)
            peer.pending_link = pending
            peer.join_deadline = time.monotonic() + self._group_timeout_s
        self._by_identity[identity] = peer

    def forget(self, peer: Peer, reason: str) -> None:
        self._discard(peer)
        log.warning("kv_peer_reset", reason=reason)

    def _discard(self, peer: Peer) -> None:
        if self._by_identity.get(peer.identity) is peer:
            del self._by_identity[peer.identity]
        pending, peer.pending_link = peer.pending_link, None
        if pending is not None and not pending.cancel():  # a stream's offer is withdrawn
            pending.add_done_callback(_close_link)  # joined (or joining): close it once done
        if peer.link is not None:
            if isinstance(peer.link, StreamLink):
                fd = peer.link.sock.fileno()
                if self._by_stream.pop(fd, None) is not None:
                    self._poller.unregister(fd)
            peer.link.close()

    def link_of(self, peer: Peer) -> PairLink | None:
        """The peer's pair link, awaiting its rendezvous if still running (None if it failed:
        the peer must handshake again)."""
        if peer.link is None and peer.pending_link is not None:
            try:
                peer.link = peer.pending_link.result(timeout=self._group_timeout_s)
            except Exception as exc:  # rendezvous failed: this peer must handshake again
                log.warning("kv_pair_link_failed", error=str(exc))
            peer.pending_link = None
        return peer.link

    def adopt_streams(self) -> None:
        """Start polling the streams whose peers have joined; withdraw the offers of those
        that did not within the group timeout (they must handshake again)."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_fd, 4096):
                pass
        if self.backend is not Backend.STREAM:
            return
        now = time.monotonic()
        for peer in list(self._by_identity.values()):
            future = peer.pending_link
            if future is None:
                continue
            if not future.done():
                if now >= peer.join_deadline and future.cancel():
                    peer.pending_link = None
                    log.warning("kv_pair_link_failed", error="payload stream: never joined")
                continue
            link = self.link_of(peer)
            if isinstance(link, StreamLink):
                self._by_stream[link.sock.fileno()] = peer
                self._poller.register(link.sock.fileno(), zmq.POLLIN)

    def close(self) -> None:
        """Close every link and the pair host (the receiving thread has stopped)."""
        self._rendezvous.shutdown(wait=False, cancel_futures=True)
        for peer in list(self._by_identity.values()):
            self._discard(peer)
        self._by_stream.clear()
        self._pairs.close()
        self._poller.unregister(self.wake_fd)
        with self._wake_lock:
            wake_w, self._wake_w = self._wake_w, None
        for fd in (self.wake_fd, wake_w):
            if fd is not None:
                os.close(fd)

    def _wake(self, _: object) -> None:
        """A link joined (or its rendezvous ended): wake the receiving thread (any thread)."""
        with self._wake_lock, contextlib.suppress(BlockingIOError):  # full: it wakes anyway
            if self._wake_w is not None:
                os.write(self._wake_w, b"\0")


def _close_link(future: Future[PairLink] | Future[StreamLink]) -> None:
    """Close the link a forgotten peer's rendezvous made after all."""
    if not future.cancelled() and future.exception() is None:
        future.result().close()
