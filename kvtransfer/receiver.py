"""Decode side of the KV channel: a ZeroMQ ROUTER that writes pages into reserved blocks.

Per peer: ``unknown -> handshaken`` (a HELLO whose fingerprint matches and, with a key, whose
MAC verifies). Per transfer: ``expected (lease running) -> receiving -> ready | failed`` (bad
frame, abort, lease expired, cancelled). Only handshaken peers may write, and only into blocks
of a transfer this worker currently expects: :meth:`KVReceiver.cancel` removes the expectation
under the lock the writer holds, so once it returns no frame can touch those blocks again; late
or duplicate frames for finished transfers are dropped and counted.

With the stream backend a page's payload is read from the pair's socket straight into the
reserved blocks, outside the lock (a page read must not hold up :meth:`expect` or other
transfers' cancels): the reader re-checks under the lock before every read that the transfer
is still expected, and :meth:`KVReceiver.cancel` waits for a read already into its blocks to
return (at most one short read slice). A page whose tag then fails to verify has written its own
transfer's blocks only, and fails that transfer: its bytes never reach attention.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog
import torch
import zmq

from engine.kv_cache import KVCache
from kvtransfer import wire
from kvtransfer.datapath import (
    Backend,
    PairLink,
    PairLinkError,
    StreamLink,
    make_host,
    tensor_bytes,
)
from kvtransfer.handshake import Fingerprint, IncompatiblePeerError, check_match
from kvtransfer.metrics import TransferStats

log = structlog.get_logger(__name__)

ReadyCallback = Callable[[str, int], None]  # (request_id, first_token_id)
FailedCallback = Callable[[str, str], None]  # (request_id, reason)

_POLL_MS = 50
_RCVHWM = 64  # messages queued per peer before senders block: bounds bytes in flight


@dataclass
class _Expected:
    request_id: str
    block_ids: frozenset[int]
    deadline: float
    started: float | None = None
    written: dict[int, set[int]] = field(default_factory=dict)  # layer -> blocks written

    def complete(self, num_layers: int) -> bool:
        """Every reserved block has been written for every layer."""
        return all(self.written.get(layer, set()) >= self.block_ids for layer in range(num_layers))


@dataclass
class _Peer:
    fingerprint: Fingerprint
    link: PairLink | None = None  # out-of-band backends only
    pending_link: Future[PairLink] | None = None  # while the rendezvous runs


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
        group_timeout_s: float = 30.0,
    ) -> None:
        self._bind_endpoint = bind_endpoint
        self._kv = kv_cache
        self.fingerprint = fingerprint
        self._auth = auth
        self._on_ready = on_ready
        self._on_failed = on_failed
        self.backend = Backend(fingerprint.backend)
        unix_path = None
        if bind_endpoint.startswith("ipc://"):  # the payload stream sits beside the endpoint
            unix_path = bind_endpoint[len("ipc://") :] + ".pages"
        self._group_timeout_s = group_timeout_s
        self._pairs = make_host(self.backend, pair_host, group_timeout_s, unix_path)
        self.writes_in_place = self.backend is Backend.STREAM and kv_cache.device.type == "cpu"
        """Payloads are read straight into reserved blocks (which a refused page may then
        have scribbled on: reserved blocks count only once a verified page marks them)."""
        self._rendezvous = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-rendezvous")
        self._expected: dict[bytes, _Expected] = {}
        self._peers: dict[bytes, _Peer] = {}
        self._lock = threading.Condition()
        self._writing: bytes | None = None  # transfer whose blocks a direct read is filling
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock: zmq.Socket[bytes] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.endpoint = bind_endpoint
        self.stats = TransferStats(self.backend.value)

    def start(self) -> str:
        """Bind and start the receiving thread; returns the bound endpoint (port resolved)."""
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, _RCVHWM)
        sock.bind(self._bind_endpoint)
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
        self._rendezvous.shutdown(wait=False, cancel_futures=True)
        for peer in self._peers.values():
            if peer.link is not None:
                peer.link.close()
        self._peers.clear()
        self._pairs.close()

    def expect(
        self, transfer_id: bytes, request_id: str, block_ids: list[int], lease_s: float
    ) -> None:
        """Accept pages for ``transfer_id`` into ``block_ids`` until the lease runs out."""
        with self._lock:
            self._expected[transfer_id] = _Expected(
                request_id, frozenset(block_ids), time.monotonic() + lease_s
            )

    def cancel(self, transfer_id: bytes) -> bool:
        """Stop accepting pages for a transfer. After this returns no frame writes its blocks."""
        with self._lock:
            found = self._expected.pop(transfer_id, None) is not None
            while self._writing == transfer_id:  # a direct read into its blocks: one slice
                self._lock.wait()
            return found

    def pending(self) -> int:
        with self._lock:
            return len(self._expected)

    # -- receiving thread -------------------------------------------------------------------

    def _loop(self) -> None:
        assert self._sock is not None
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if poller.poll(_POLL_MS):
                for _ in range(256):  # drain a burst, then check leases
                    try:
                        frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        self._handle(frames[0].bytes, frames[1:])
                    except Exception:  # one bad peer must not stop the channel
                        log.exception("kv_frame_error")
                        self.stats.drop("internal_error")
            self._expire_leases()
        self._sock.close(linger=0)

    def _handle(self, peer: bytes, frames: list[zmq.Frame]) -> None:
        if not frames:
            self.stats.drop("empty")
            return
        payload = frames[1].buffer if len(frames) == 2 else None
        known = self._peers.get(peer)
        try:
            header = wire.decode(frames[0].buffer, self._auth, payload)
        except wire.MalformedFrameError as exc:
            self._drop_bad_frame(known, frames[0].buffer, exc)
            return
        if isinstance(header, wire.HandshakeHeader):
            self._handshake(peer, header)
            return
        if known is None:
            # an out-of-band header cannot be authenticated without its payload: from a
            # stranger, on a keyed channel, count it as what it is, unauthenticated
            oob = isinstance(header, wire.PageHeader) and header.out_of_band
            self.stats.drop("unauthenticated" if oob and self._auth.key else "no_handshake")
            if isinstance(header, wire.DoneHeader):
                self._ack(peer, header.transfer_id, wire.AckStatus.FAILED, "handshake required")
            return
        data: torch.Tensor | memoryview | None = payload
        if isinstance(header, wire.PageHeader) and header.out_of_band != self.backend.out_of_band:
            self.stats.drop("malformed")  # the payload is not where this backend carries it
            return
        if isinstance(header, wire.PageHeader) and header.out_of_band:
            if self.writes_in_place and self._receive_direct(known, header, frames[0].buffer):
                return
            data = self._receive_out_of_band(known, header, frames[0].buffer)
            if data is None:
                return
        tid = header.transfer_id
        with self._lock:
            expected = self._expected.get(tid)
            outcome = None if expected is None else self._apply(tid, expected, header, data)
        if expected is None:
            self.stats.drop("unknown_transfer")  # late, duplicate, expired or cancelled
            if isinstance(header, wire.DoneHeader):  # tell the sender now, not at its timeout
                self._ack(peer, tid, wire.AckStatus.FAILED, "unknown, finished or expired transfer")
            return
        if outcome is not None:
            self._conclude(peer, tid, expected, outcome)

    def _conclude(
        self, peer: bytes, tid: bytes, expected: _Expected, outcome: tuple[str, bool, str]
    ) -> None:
        """Report a transfer that just ended (already removed from the expected ones):
        ``outcome`` is ``(request_id, ok, first token id or failure reason)``."""
        request_id, ok, message = outcome
        if ok:
            self.stats.completed(time.monotonic() - (expected.started or time.monotonic()))
            self._ack(peer, tid, wire.AckStatus.OK, "")
            self._on_ready(request_id, int(message))
        else:
            self.stats.fail(failure_label(message))
            log.warning("kv_transfer_failed", request_id=request_id, reason=message)
            self._ack(peer, tid, wire.AckStatus.FAILED, message)
            self._on_failed(request_id, f"KV transfer failed: {message}")

    def _drop_bad_frame(
        self, known: _Peer | None, frame: memoryview, exc: wire.MalformedFrameError
    ) -> None:
        """Count a frame that failed decoding; for an out-of-band PAGE from a handshaken peer,
        still take its payload off the pair group so the sender is not left blocked."""
        unauthenticated = isinstance(exc, wire.UnauthenticatedFrameError)
        self.stats.drop("unauthenticated" if unauthenticated else "malformed")
        log.warning("kv_frame_dropped", reason=str(exc))
        if known is None or not self.backend.out_of_band or not wire.is_out_of_band_page(frame):
            return
        nbytes = wire.out_of_band_payload_size(frame)
        link = self._link_of(known)
        if nbytes is None or link is None:
            # the payload's size is unknowable: the pair stream cannot be resynchronised, so
            # forget the peer; its pending send fails and it must handshake again
            self._forget(known, "unreadable out-of-band page header")
            return
        try:
            link.discard(nbytes)
        except PairLinkError as exc:
            self._forget(known, str(exc))

    def _forget(self, state: _Peer, reason: str) -> None:
        for identity, peer in list(self._peers.items()):
            if peer is state:
                del self._peers[identity]
        if state.link is not None:
            state.link.close()
        log.warning("kv_peer_reset", reason=reason)

    def _link_of(self, peer: _Peer) -> PairLink | None:
        if peer.link is None and peer.pending_link is not None:
            try:
                peer.link = peer.pending_link.result(timeout=self._group_timeout_s)
            except Exception as exc:  # rendezvous failed: this peer must handshake again
                log.warning("kv_pair_link_failed", error=str(exc))
            peer.pending_link = None
        return peer.link

    def _handshake(self, peer: bytes, hello: wire.HandshakeHeader) -> None:
        if hello.kind is not wire.FrameKind.HELLO:
            self.stats.drop("unexpected_handshake")
            return
        try:
            theirs = Fingerprint.from_fields(hello.fields.get("fingerprint", {}))
            check_match(self.fingerprint, theirs, "prefill worker")
        except IncompatiblePeerError as exc:
            log.warning("kv_peer_refused", reason=str(exc))
            self.stats.fail("incompatible_peer")
            self._send(
                peer,
                wire.HandshakeHeader(
                    hello.transfer_id, wire.FrameKind.REFUSE, {"reason": str(exc)}
                ),
            )
            return
        fields: dict[str, object] = {"fingerprint": self.fingerprint.to_fields()}
        offer = self._pairs.offer() if self.backend.out_of_band else None
        if offer is not None:
            fields["rendezvous"] = offer
        self._send(peer, wire.HandshakeHeader(hello.transfer_id, wire.FrameKind.WELCOME, fields))
        state = _Peer(theirs)
        if offer is not None:  # joined off this thread: a peer that never joins stalls nobody
            state.pending_link = self._rendezvous.submit(self._pairs.accept, offer)
        self._peers[peer] = state
        log.info("kv_peer_accepted", backend=self.backend.value)

    def _receive_direct(self, known: _Peer, header: wire.PageHeader, frame: memoryview) -> bool:
        """Stream backend: read the payload that follows this header straight into its
        transfer's reserved blocks, then verify it together with the header. A page that does
        not verify is dropped and its blocks are marked unwritten again (the transfer cannot
        finish unless a good copy follows). Returns False, having read nothing, when the page
        cannot land (unknown transfer, a page outside its reservation): the general path then
        takes it, verifies it and reports it."""
        link = self._link_of(known)
        if not isinstance(link, StreamLink):
            return False
        tid = header.transfer_id
        with self._lock:
            expected = self._expected.get(tid)
            if expected is None:
                return False
            try:
                self._check_page(expected, header)
            except wire.MalformedFrameError:
                return False
            if expected.started is None:
                expected.started = time.monotonic()
        regions = self._kv.page_regions(header.block_ids, header.layers)
        try:
            landed = self._read_direct(link, tid, expected, regions, header.payload_nbytes)
        except PairLinkError as exc:  # part of a page may lie in its blocks, unmarked
            self._forget(known, str(exc))
            return True
        if not landed:
            self.stats.drop("unknown_transfer")  # cancelled or expired while reading
            return True
        try:
            wire.verify_out_of_band(frame, self._auth, [tensor_bytes(r) for r in regions])
            verified = True
        except wire.MalformedFrameError as exc:
            unauthenticated = isinstance(exc, wire.UnauthenticatedFrameError)
            self.stats.drop("unauthenticated" if unauthenticated else "malformed")
            verified = False
        with self._lock:
            if self._expected.get(tid) is not expected:
                self.stats.drop("unknown_transfer")
            elif verified:
                self._mark_written(expected, header)
            else:
                for layer in range(header.layer_start, header.layer_end):
                    expected.written.get(layer, set()).difference_update(header.block_ids)
        return True

    def _read_direct(
        self,
        link: StreamLink,
        tid: bytes,
        expected: _Expected | None,
        regions: list[torch.Tensor],
        nbytes: int,
    ) -> bool:
        """Fill ``regions`` (pool memory of ``expected``'s blocks) from the link, one read
        slice at a time, checking before each read that the transfer still owns them; once it
        does not (cancelled, expired), the rest of the payload is discarded. Without regions
        the whole payload is discarded. Returns whether every byte landed."""
        left = nbytes
        for region in regions:
            view = tensor_bytes(region)
            filled, last = 0, time.monotonic()
            while filled < len(view):
                with self._lock:
                    owned = self._expected.get(tid) is expected
                    if owned:
                        self._writing = tid
                if not owned:
                    link.discard(left)
                    return False
                try:
                    count = link.read_some(view[filled:])
                finally:
                    with self._lock:
                        self._writing = None
                        self._lock.notify_all()
                filled += count
                left -= count
                now = time.monotonic()
                if count:
                    last = now
                elif now - last > link.timeout_s:
                    raise PairLinkError(f"payload stream: no data for {link.timeout_s:.0f}s")
        if left:
            link.discard(left)
        return left == 0 and bool(regions)

    def _receive_out_of_band(
        self, peer: _Peer, header: wire.PageHeader, frame: memoryview
    ) -> torch.Tensor | None:
        """Take the payload that follows an out-of-band PAGE header (always, to stay in step
        with the sender), then authenticate it together with the header. A payload received
        on a GPU is authenticated by its header alone: hashing it would cost a device copy."""
        link = self._link_of(peer)
        if link is None:
            self.stats.drop("no_pair_group")
            return None
        try:
            pages = link.receive(header.shape, header.dtype, self._kv.device)
        except PairLinkError as exc:
            self._forget(peer, str(exc))
            return None
        data = tensor_bytes(pages) if pages.device.type == "cpu" else None
        try:
            wire.verify_out_of_band(frame, self._auth, data)
        except wire.MalformedFrameError as exc:
            unauthenticated = isinstance(exc, wire.UnauthenticatedFrameError)
            self.stats.drop("unauthenticated" if unauthenticated else "malformed")
            return None
        return pages

    def _apply(
        self,
        tid: bytes,
        expected: _Expected,
        header: wire.Header,
        payload: torch.Tensor | memoryview | None,
    ) -> tuple[str, bool, str] | None:
        """Apply one frame of an expected transfer (lock held); returns its outcome when it
        ends the transfer: ``(request_id, ok, first token id or failure reason)``."""
        if expected.started is None:
            expected.started = time.monotonic()
        try:
            if isinstance(header, wire.PageHeader):
                if payload is None:
                    raise wire.MalformedFrameError("size: PAGE without its payload")
                self._write_page(expected, header, payload)
                return None
            if isinstance(header, wire.DoneHeader):
                if header.num_layers != self._kv.num_layers:
                    raise wire.MalformedFrameError(
                        f"layers: DONE for {header.num_layers}, receiver has {self._kv.num_layers}"
                    )
                if not expected.complete(self._kv.num_layers):
                    raise wire.MalformedFrameError(
                        "incomplete: DONE with layers missing (a reserved block has not arrived)"
                    )
                del self._expected[tid]
                return (expected.request_id, True, str(header.first_token_id))
            if isinstance(header, wire.AbortHeader):
                raise wire.MalformedFrameError(f"aborted: sender aborted: {header.reason}")
            raise wire.MalformedFrameError("unexpected: ACK on the receiving side")
        except wire.MalformedFrameError as exc:
            del self._expected[tid]
            return (expected.request_id, False, str(exc))

    def _check_page(self, expected: _Expected, header: wire.PageHeader) -> None:
        """Raise unless the page fits this receiver and lands inside the reservation."""
        kv = self._kv
        geometry = (header.block_size, header.num_kv_heads, header.head_dim, header.dtype)
        mine = (kv.block_size, kv.num_kv_heads, kv.head_dim, kv.dtype)
        if geometry != mine:
            raise wire.MalformedFrameError(f"geometry: page {geometry} != receiver's {mine}")
        if header.layer_end > kv.num_layers:
            raise wire.MalformedFrameError(f"layers: {header.layer_end - 1} >= {kv.num_layers}")
        if not expected.block_ids.issuperset(header.block_ids):
            raise wire.MalformedFrameError("blocks: page targets blocks outside the reservation")

    def _mark_written(self, expected: _Expected, header: wire.PageHeader) -> None:
        for layer in range(header.layer_start, header.layer_end):
            expected.written.setdefault(layer, set()).update(header.block_ids)
        self.stats.pages += 1
        self.stats.bytes += header.payload_nbytes

    def _write_page(
        self, expected: _Expected, header: wire.PageHeader, payload: torch.Tensor | memoryview
    ) -> None:
        kv = self._kv
        self._check_page(expected, header)
        if isinstance(payload, torch.Tensor):  # out of band: already shaped
            pages = payload
        else:
            wire.check_payload_size(header, payload)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we only read it
                flat = torch.frombuffer(payload, dtype=torch.uint8)
            pages = flat.view(header.dtype).view(header.shape)
        kv.scatter_pages(header.block_ids, pages, slice(header.layer_start, header.layer_end))
        self._mark_written(expected, header)

    def _ack(self, peer: bytes, tid: bytes, status: wire.AckStatus, message: str) -> None:
        self._send(peer, wire.AckHeader(tid, status, message))

    def _send(self, peer: bytes, header: wire.Header) -> None:
        assert self._sock is not None
        try:
            self._sock.send_multipart([peer, wire.encode(header, self._auth)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("kv_reply_failed", reason=str(exc))

    def _expire_leases(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [(tid, e) for tid, e in self._expected.items() if e.deadline <= now]
            for tid, _ in expired:
                del self._expected[tid]
        for _, e in expired:
            self.stats.fail("lease_expired")
            log.warning("kv_lease_expired", request_id=e.request_id)
            self._on_failed(e.request_id, "KV transfer lease expired before all pages arrived")


def failure_label(message: str) -> str:
    """A bounded metric label for a failure message: its ``label:`` prefix, or "malformed"."""
    head, sep, _ = message.partition(":")
    label = head.strip().replace(" ", "_")
    return label if sep and label.isidentifier() and len(label) <= 24 else "malformed"
