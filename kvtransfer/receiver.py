"""Decode side of the KV channel: a ZeroMQ ROUTER (and, for the stream backend, one stream
socket per peer) whose frames write pages into reserved blocks.

Per peer: ``unknown -> handshaken`` (a HELLO whose fingerprint matches and, with a key, whose
MAC verifies). Per transfer: ``expected (lease running) -> receiving -> ready | failed`` (bad
frame, abort, lease expired, cancelled). Only handshaken peers may write, only into blocks
of a transfer this worker currently expects, and only the sender that first wrote to it (a
frame from any other peer, a stranger replaying captured frames included, is dropped and never
ends the transfer; a stranger is told to handshake, and a genuine sender that lost its
connection then aborts what it had sent). :meth:`KVReceiver.cancel` removes the expectation
under the lock writers hold (or wait on, see ``kvtransfer.reservations``), so once it returns no
frame can touch those blocks again; late or duplicate frames for finished transfers are dropped
and counted. What each frame does to the pool is ``kvtransfer.page_writer``'s business; who
is handshaken, and over which pair link, ``kvtransfer.receive_peers``'s.

Where frames arrive, by backend: ``zmq``, every frame (payload in the PAGE message) on the
ROUTER; ``gloo``/``nccl``, frames on the ROUTER and page payloads on the pair group; ``stream``,
the handshake on the ROUTER, then the transfer's frames as records on the pair's stream socket,
payloads read in place. Acks always go back on the ROUTER.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import assert_never

import structlog
import torch
import zmq

from core.ticket import Fingerprint, IncompatiblePeerError, check_match
from engine.kv_cache import KVCache
from kvtransfer import wire
from kvtransfer.datapath import Backend, PairLinkError, StreamLink, make_host, refuse_encryption
from kvtransfer.handshake import HelloGuard, StaleHelloError, peer_fingerprint, sender_of
from kvtransfer.metrics import TransferStats, failure_label
from kvtransfer.out_of_band import skip_group_payload, take_group_payload, take_record
from kvtransfer.page_writer import (
    Completed,
    Failed,
    ForeignWriterError,
    Outcome,
    PageRefusedError,
    PageWriter,
    UnknownTransferError,
)
from kvtransfer.receive_peers import Peer, PeerTable
from kvtransfer.reservations import Reservations

log = structlog.get_logger(__name__)

ReadyCallback = Callable[[str, int], None]  # (request_id, first_token_id)
FailedCallback = Callable[[str, str], None]  # (request_id, reason)

_POLL_MS = 50
_RCVHWM = 64  # messages queued per peer before senders block: bounds bytes in flight
_RECORDS_PER_WAKE = 64  # records read from one stream before looking at the others again
_MAX_REASON_CHARS = 300  # a REFUSE's reason: 12 JSON bytes a character at worst, in 4 KB


class KVReceiver:
    def __init__(
        self,
        bind_endpoint: str,
        kv_cache: KVCache,
        fingerprint: Fingerprint,
        auth: wire.FrameAuth,
        on_ready: ReadyCallback,
        on_failed: FailedCallback,
        *,
        pair_host: str = "127.0.0.1",
        stream_port: int = 0,
        group_timeout_s: float = 30.0,
    ) -> None:
        self._bind_endpoint = bind_endpoint
        self._kv = kv_cache
        self.fingerprint = fingerprint
        self._auth = auth
        self._on_ready = on_ready
        self._on_failed = on_failed
        self.backend = Backend(fingerprint.backend)
        refuse_encryption(self.backend, auth)
        unix_path = None
        if bind_endpoint.startswith("ipc://"):  # the payload stream sits beside the endpoint
            unix_path = bind_endpoint[len("ipc://") :] + ".pages"
        pairs = make_host(
            self.backend, pair_host, group_timeout_s, unix_path, stream_port, auth.stream_proof
        )
        self.writes_in_place = (
            self.backend in (Backend.ZMQ, Backend.STREAM) and kv_cache.device.type == "cpu"
        )
        """Payloads land in reserved blocks before their tag is checked (read straight into
        them, or copied from the ZeroMQ frame and hashed piece by piece), so a refused page may
        have scribbled on them: reserved blocks count only once a verified page marks them."""
        self._reservations = Reservations()
        self.stats = TransferStats(self.backend.value)
        self._writer = PageWriter(kv_cache, self._reservations, auth, self.stats)
        self._poller = zmq.Poller()
        self._peers = PeerTable(self.backend, pairs, self._poller, group_timeout_s)
        self._hellos = HelloGuard()
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock: zmq.Socket[bytes] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.endpoint = bind_endpoint

    def start(self) -> str:
        """Bind and start the receiving thread; returns the bound endpoint (port resolved)."""
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, _RCVHWM)
        try:
            sock.bind(self._bind_endpoint)
        except zmq.ZMQError:
            sock.close(linger=0)  # e.g. the address is still in use: start() may be retried
            raise
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock = sock
        self._thread = threading.Thread(target=self._loop, name="kv-receiver", daemon=True)
        self._thread.start()
        log.info(
            "kv_receiver_listening",
            endpoint=self.endpoint,
            backend=self.backend.value,
            authenticated=self._auth.key is not None,
        )
        return self.endpoint

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._peers.close()

    def expect(
        self, transfer_id: bytes, request_id: str, block_ids: list[int], lease_s: float
    ) -> None:
        """Accept pages for ``transfer_id`` into ``block_ids`` until the lease runs out."""
        self._reservations.expect(transfer_id, request_id, block_ids, lease_s)

    def cancel(self, transfer_id: bytes) -> bool:
        """Stop accepting pages for a transfer. After this returns no frame writes its blocks."""
        return self._reservations.cancel(transfer_id)

    def pending(self) -> int:
        return self._reservations.pending()

    # -- receiving thread -------------------------------------------------------------------

    def _loop(self) -> None:
        assert self._sock is not None
        torch.set_num_threads(1)  # page copies stay serial here: the engine thread owns the cores
        self._poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            self._peers.adopt_streams()  # a joined stream wakes the poll (PeerTable.wake_fd)
            events = self._poller.poll(_POLL_MS)
            for source, _ in events:
                if source is self._sock:
                    self._drain_router()
                else:
                    peer = self._peers.on_stream(int(source))
                    if peer is not None:
                        self._drain_stream(peer)
            self._expire_leases()
        self._sock.close(linger=0)

    def _drain_router(self) -> None:
        assert self._sock is not None
        for _ in range(256):  # drain a burst, then look at the streams and leases
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self._handle(frames[0].bytes, frames[1:])
            except Exception:  # one bad peer must not stop the channel
                log.exception("kv_frame_error")
                self.stats.drop("internal_error")

    def _handle(self, identity: bytes, frames: list[zmq.Frame]) -> None:
        """A message on the ROUTER."""
        if not frames:
            self.stats.drop("empty")
            return
        payload = frames[1].buffer if len(frames) == 2 else None
        known = self._peers.get(identity)
        # an in-band page's tag is checked while it is copied into place (one pass over it)
        defer = payload is not None and self.backend is Backend.ZMQ and self.writes_in_place
        try:
            header = wire.decode(frames[0].buffer, self._auth, payload, defer_page=defer)
        except wire.MalformedFrameError as exc:
            if defer:  # a forged frame counts as unauthenticated, whatever its body says
                exc = self._writer.judge_whole(frames[0].buffer, payload, exc)
            self._drop_bad_frame(known, frames[0].buffer, exc)
            return
        if isinstance(header, wire.HandshakeHeader):
            self._handshake(identity, header)
            return
        deferred = defer and isinstance(header, wire.PageHeader) and not header.out_of_band
        if known is None:
            if deferred and not self._writer.verified(frames[0].buffer, payload):
                return  # a stranger's page: judged whole, as any frame of a stranger
            # an out-of-band header cannot be authenticated without its payload: from a
            # stranger, on a keyed channel, count it as what it is, unauthenticated
            oob = isinstance(header, wire.PageHeader) and header.out_of_band
            authentic = not (oob and self._auth.key)
            self.stats.drop("no_handshake" if authentic else "unauthenticated")
            if authentic:
                self._refuse_stranger(identity, header)
            return
        check = wire.payload_check(frames[0].buffer, self._auth) if deferred else None
        data: torch.Tensor | memoryview | None = payload
        if isinstance(header, wire.PageHeader):
            if header.out_of_band != self.backend.out_of_band or self.backend is Backend.STREAM:
                self.stats.drop("malformed")  # the payload is not where this backend carries it
                return
            if header.out_of_band:
                data = self._receive_from_group(known, header, frames[0].buffer)
                if data is None:
                    return
        self._apply(known, header, data, check)

    def _apply(
        self,
        peer: Peer,
        header: wire.Header,
        payload: torch.Tensor | memoryview | None,
        check: wire.PayloadCheck | None = None,
    ) -> None:
        """Apply a frame from a handshaken peer (authenticated, or a page authenticated by
        ``check`` as it is copied) and report what it ended."""
        try:
            outcome = self._writer.apply(header, payload, peer.sender, check)
        except PageRefusedError as exc:
            self._writer.refuse(exc.cause)
            return
        except ForeignWriterError as exc:
            self.stats.drop("other_sender")
            log.warning("kv_frame_from_other_sender", request_id=exc.args[0])
            if isinstance(header, wire.DoneHeader):  # tell the sender now, not at its timeout
                self._ack(
                    peer.identity,
                    header.transfer_id,
                    wire.AckStatus.FAILED,
                    "the transfer belongs to another sender",
                )
            return
        except UnknownTransferError:
            self.stats.drop("unknown_transfer")  # late, duplicate, expired or cancelled
            if isinstance(header, wire.DoneHeader):  # tell the sender now, not at its timeout
                self._ack(
                    peer.identity,
                    header.transfer_id,
                    wire.AckStatus.FAILED,
                    "unknown, finished or expired transfer",
                )
            return
        if outcome is not None:
            self._conclude(peer.identity, header.transfer_id, outcome)

    def _conclude(self, identity: bytes, tid: bytes, outcome: Outcome) -> None:
        """Report a transfer that just ended (it is no longer expected)."""
        reservation = outcome.reservation
        match outcome:
            case Completed(first_token_id=first_token_id):
                started = reservation.started or time.monotonic()
                self.stats.completed(time.monotonic() - started)
                self._ack(identity, tid, wire.AckStatus.OK, "")
                self._on_ready(reservation.request_id, first_token_id)
            case Failed(reason=reason):
                self.stats.fail(failure_label(reason))
                log.warning("kv_transfer_failed", request_id=reservation.request_id, reason=reason)
                self._ack(identity, tid, wire.AckStatus.FAILED, reason)
                self._on_failed(reservation.request_id, f"KV transfer failed: {reason}")
            case _:
                assert_never(outcome)

    # -- the stream backend: records on each peer's stream socket ---------------------------

    def _drain_stream(self, peer: Peer) -> None:
        link = peer.link
        assert isinstance(link, StreamLink)
        for _ in range(_RECORDS_PER_WAKE):
            try:
                self._read_record(peer, link)
            except PairLinkError as exc:
                self._peers.forget(peer, str(exc))
                return
            except Exception:  # one bad peer must not stop the channel
                log.exception("kv_frame_error")
                self.stats.drop("internal_error")
                self._peers.forget(peer, "internal error while reading its stream")
                return
            if not link.readable():
                return

    def _read_record(self, peer: Peer, link: StreamLink) -> None:
        taken = take_record(link, self._auth, self._writer, peer.sender)
        if taken is not None:
            self._apply(peer, *taken)

    # -- peers ------------------------------------------------------------------------------

    def _drop_bad_frame(
        self, known: Peer | None, frame: memoryview, exc: wire.MalformedFrameError
    ) -> None:
        """Count a ROUTER frame that failed decoding; for an out-of-band PAGE from a
        handshaken peer of a pair-group backend, still take its payload off the group so the
        sender is not left blocked (or forget the peer, which must then handshake again)."""
        self._writer.refuse(exc)
        groups = self.backend in (Backend.GLOO, Backend.NCCL)
        if known is not None and groups and wire.is_out_of_band_page(frame):
            try:
                skip_group_payload(self._peers.link_of(known), frame)
            except PairLinkError as exc:
                self._peers.forget(known, str(exc))

    def _handshake(self, identity: bytes, hello: wire.HandshakeHeader) -> None:
        if hello.kind is not wire.FrameKind.HELLO:
            self.stats.drop("unexpected_handshake")
            return
        try:
            theirs = peer_fingerprint(hello.fields)
            check_match(self.fingerprint, theirs, "prefill worker")
            if self._auth.key is not None:  # without a key anyone may say HELLO anyway
                self._hellos.admit(hello.transfer_id, hello.fields)
        except IncompatiblePeerError as exc:
            log.warning("kv_peer_refused", reason=str(exc))
            if isinstance(exc, StaleHelloError):
                self.stats.drop("stale_handshake")
            else:
                self.stats.fail("incompatible_peer")
            reason = str(exc)[:_MAX_REASON_CHARS]  # it quotes the peer's values
            refuse = wire.HandshakeHeader(
                hello.transfer_id, wire.FrameKind.REFUSE, {"reason": reason}
            )
            self._send(identity, refuse)
            return
        previous = self._peers.get(identity)
        if previous is not None:  # a re-handshake replaces the old pair link
            self._peers.forget(previous, "handshake again")
        fields: dict[str, object] = {"fingerprint": self.fingerprint.to_fields()}
        offer = self._peers.offer()
        if offer is not None:
            fields["rendezvous"] = offer
        self._send(
            identity, wire.HandshakeHeader(hello.transfer_id, wire.FrameKind.WELCOME, fields)
        )
        sender = sender_of(hello.fields, identity)
        self._peers.admit(identity, theirs, sender, offer, replaces=self._auth.key is not None)
        integrity = str(hello.fields.get("payload_integrity", "unstated"))[:32]
        log.info("kv_peer_accepted", backend=self.backend.value, payload_integrity=integrity)

    def _refuse_stranger(self, identity: bytes, header: wire.Header) -> None:
        """An authentic frame from a peer that has not handshaken with this process (it
        handshook with the one before a restart on this endpoint, or was forgotten, or
        replays frames it captured): dropped, and it ends nothing, whatever it is (a stranger
        cannot end a transfer another peer is filling). It is told to handshake again, for
        every frame naming a reserved transfer and every DONE: a genuine sender then does,
        and aborts the transfers whose frames were dropped, which frees them at once."""
        if not isinstance(header, wire.PageHeader | wire.DoneHeader | wire.AbortHeader):
            return
        reserved = self._reservations.expects(header.transfer_id)
        if reserved:
            log.info("kv_frame_from_stranger", kind=type(header).__name__)
        if reserved or isinstance(header, wire.DoneHeader):
            self._ack(identity, header.transfer_id, wire.AckStatus.FAILED, wire.HANDSHAKE_REQUIRED)

    def _receive_from_group(
        self, peer: Peer, header: wire.PageHeader, frame: memoryview
    ) -> torch.Tensor | None:
        link = self._peers.link_of(peer)
        if link is None:
            self.stats.drop("no_pair_group")
            return None
        try:
            return take_group_payload(link, header, frame, self._writer)
        except PairLinkError as exc:
            self._peers.forget(peer, str(exc))
            return None

    def _ack(self, identity: bytes, tid: bytes, status: wire.AckStatus, message: str) -> None:
        self._send(identity, wire.AckHeader(tid, status, message))

    def _send(self, identity: bytes, header: wire.Header) -> None:
        assert self._sock is not None
        try:
            self._sock.send_multipart([identity, wire.encode(header, self._auth)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("kv_reply_failed", reason=str(exc))

    def _expire_leases(self) -> None:
        for reservation in self._reservations.pop_expired(time.monotonic()):
            self.stats.fail("lease_expired")
            log.warning("kv_lease_expired", request_id=reservation.request_id)
            self._on_failed(
                reservation.request_id, "KV transfer lease expired before all pages arrived"
            )
