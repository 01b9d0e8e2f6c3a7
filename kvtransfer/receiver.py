"""Decode side of the KV channel: a ZeroMQ ROUTER that writes pages into reserved blocks.

Per peer: ``unknown -> handshaken`` (a HELLO whose fingerprint matches and, with a key, whose
MAC verifies). Per transfer: ``expected (lease running) -> receiving -> ready | failed`` (bad
frame, abort, lease expired, cancelled). Only handshaken peers may write, and only into blocks
of a transfer this worker currently expects: :meth:`KVReceiver.cancel` removes the expectation
under the lock the writer holds, so once it returns no frame can touch those blocks again; late
or duplicate frames for finished transfers are dropped and counted.
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
from kvtransfer.datapath import Backend, PairGroup, PairGroupHost, recv_tensor, tensor_bytes
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
    group: PairGroup | None = None  # out-of-band backends only
    pending_group: Future[PairGroup] | None = None  # while the rendezvous runs


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
        self._pairs = PairGroupHost(self.backend, pair_host, group_timeout_s)
        self._rendezvous = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-rendezvous")
        self._expected: dict[bytes, _Expected] = {}
        self._peers: dict[bytes, _Peer] = {}
        self._lock = threading.Lock()
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
            return self._expected.pop(transfer_id, None) is not None

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
        if outcome is None:
            return
        request_id, ok, message = outcome
        if ok:
            assert expected.started is not None
            self.stats.completed(time.monotonic() - expected.started)
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
        group = self._group_of(known)
        if nbytes is None or group is None:
            # the payload's size is unknowable: the pair stream cannot be resynchronised, so
            # forget the peer; its pending send fails and it must handshake again
            self._forget(known)
            return
        recv_tensor(group, (nbytes,), torch.uint8, self._kv.device, 1)

    def _forget(self, state: _Peer) -> None:
        for identity, peer in list(self._peers.items()):
            if peer is state:
                del self._peers[identity]
        log.warning("kv_peer_reset", reason="unreadable out-of-band page header")

    def _group_of(self, peer: _Peer) -> PairGroup | None:
        if peer.group is None and peer.pending_group is not None:
            try:
                peer.group = peer.pending_group.result(timeout=self._pairs.timeout.total_seconds())
            except Exception as exc:  # rendezvous failed: this peer must handshake again
                log.warning("kv_pair_group_failed", error=str(exc))
            peer.pending_group = None
        return peer.group

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
            state.pending_group = self._rendezvous.submit(self._pairs.accept, offer)
        self._peers[peer] = state
        log.info("kv_peer_accepted", backend=self.backend.value)

    def _receive_out_of_band(
        self, peer: _Peer, header: wire.PageHeader, frame: memoryview
    ) -> torch.Tensor | None:
        """Take the payload that follows an out-of-band PAGE header (always, to stay in step
        with the sender), then authenticate it together with the header. A payload received
        on a GPU is authenticated by its header alone: hashing it would cost a device copy."""
        group = self._group_of(peer)
        if group is None:
            self.stats.drop("no_pair_group")
            return None
        pages = recv_tensor(group, header.shape, header.dtype, self._kv.device, 1)
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

    def _write_page(
        self, expected: _Expected, header: wire.PageHeader, payload: torch.Tensor | memoryview
    ) -> None:
        kv = self._kv
        geometry = (header.block_size, header.num_kv_heads, header.head_dim, header.dtype)
        mine = (kv.block_size, kv.num_kv_heads, kv.head_dim, kv.dtype)
        if geometry != mine:
            raise wire.MalformedFrameError(f"geometry: page {geometry} != receiver's {mine}")
        if header.layer_end > kv.num_layers:
            raise wire.MalformedFrameError(f"layers: {header.layer_end - 1} >= {kv.num_layers}")
        if not expected.block_ids.issuperset(header.block_ids):
            raise wire.MalformedFrameError("blocks: page targets blocks outside the reservation")
        if isinstance(payload, torch.Tensor):  # out of band: already shaped
            pages = payload
        else:
            wire.check_payload_size(header, payload)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we only read it
                flat = torch.frombuffer(payload, dtype=torch.uint8)
            pages = flat.view(header.dtype).view(header.shape)
        kv.scatter_pages(header.block_ids, pages, slice(header.layer_start, header.layer_end))
        for layer in range(header.layer_start, header.layer_end):
            expected.written.setdefault(layer, set()).update(header.block_ids)
        self.stats.pages += 1
        self.stats.bytes += header.payload_nbytes

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
