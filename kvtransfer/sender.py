"""Prefill side of the KV channel: pushes pages to decode workers, layer by layer.

The owner (the prefill worker) drives a transfer with :meth:`KVSender.open`, then
:meth:`KVSender.send_pages` as layers finish (or once, after the whole prefill), then
:meth:`KVSender.finish` with the first token, or :meth:`KVSender.abort`. These calls only queue
commands; one thread owns every socket and runs each transfer's state machine::

    peer:      new -> handshaking (HELLO sent) -> ready | refused
    transfer:  open -> sending -> awaiting ack -> done | failed
               (refused peer, send error, nack, ack timeout, abort)

Flow control: ``send_pages`` blocks its caller while the peer's queued bytes exceed
``max_queued_bytes`` (the decode worker's ZeroMQ high-water mark bounds what is on the wire), so
a slow decode worker slows its prefill workers instead of growing their memory without bound
(see :class:`~kvtransfer.send_budget.SendBudget`).
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import torch
import zmq

from core.ticket import Fingerprint, IncompatiblePeerError, check_match
from kvtransfer import wire
from kvtransfer.datapath import Backend, PairLink, StreamLink, join_pair, tensor_bytes
from kvtransfer.handshake import hello_fields
from kvtransfer.metrics import TransferStats
from kvtransfer.send_budget import SendBudget, TransferSpec, check_pages

__all__ = ["KVSender", "SentCallback", "TransferBackpressureError", "TransferSpec"]

log = structlog.get_logger(__name__)

SentCallback = Callable[[str, bool, str], None]  # (request_id, ok, message)

_SEND_TIMEOUT_MS = 10_000
_SNDHWM = 64
_IDLE_POLL_MS = 50  # deadline checks (acks, handshakes) run at least this often
DEFAULT_MAX_QUEUED_BYTES = 512 << 20


class TransferBackpressureError(Exception):
    """The peer did not drain its queue in time; the transfer was aborted."""


@dataclass
class _Transfer:
    spec: TransferSpec
    started: float
    deadline: float | None = None  # set once DONE is sent
    failed: str | None = None


@dataclass
class _Peer:
    endpoint: str
    sock: zmq.Socket[bytes]
    state: str = "new"  # new | handshaking | ready | refused
    hello_id: bytes = b""
    hello_deadline: float = 0.0
    refusal: str = ""
    link: PairLink | None = None  # out-of-band backends: the pair's payload channel
    backlog: collections.deque[tuple[str, bytes, object]] = field(default_factory=collections.deque)


class KVSender:
    def __init__(
        self,
        fingerprint: Fingerprint,
        auth: wire.FrameAuth,
        *,
        ack_timeout_s: float = 30.0,
        handshake_timeout_s: float = 10.0,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        on_sent: SentCallback | None = None,
    ) -> None:
        self.fingerprint = fingerprint
        self.backend = Backend(fingerprint.backend)
        self._auth = auth
        self._ack_timeout = ack_timeout_s
        self._handshake_timeout = handshake_timeout_s
        self._on_sent = on_sent
        self._commands: queue.Queue[tuple[str, bytes, object]] = queue.Queue()
        self._transfers: dict[bytes, _Transfer] = {}  # owned by the sending thread
        self._peers: dict[str, _Peer] = {}
        self._poller = zmq.Poller()
        self._wake_r, self._wake_w = os.pipe()  # closed with the sender, never before
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._budget = SendBudget(max_queued_bytes)
        self.stats = TransferStats(self.backend.value)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kv-sender", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"\0")
            self._thread.join(timeout=5)

    # -- the owner's side (any thread) ------------------------------------------------------

    def open(self, spec: TransferSpec) -> None:
        """Start a transfer; the peer handshake (if new) begins now, overlapping the prefill.
        Raises ValueError for a transfer id already open."""
        self._budget.open(spec)
        self._put(("open", spec.transfer_id, spec))

    def send_pages(self, transfer_id: bytes, layer_start: int, pages: torch.Tensor) -> None:
        """Queue pages ``(L', 2, n, bs, KVH, D)`` for layers from ``layer_start``. Blocks while
        the queue of the transfer's decode worker is over budget; raises
        :class:`TransferBackpressureError` (and aborts the transfer) if it stays so past the ack
        timeout. Pages for a transfer that already
        ended are dropped; pages the transfer cannot carry abort it and raise ValueError."""
        spec = self._budget.spec(transfer_id)
        if spec is None:
            return
        try:
            check_pages(self.fingerprint, spec, layer_start, pages)
        except ValueError as exc:
            self._put(("abort", transfer_id, f"invalid pages: {exc}"))
            raise
        nbytes = pages.numel() * pages.element_size()
        if not self._budget.reserve(spec.endpoint, nbytes, self._ack_timeout, self._stop):
            self._put(("abort", transfer_id, "backpressure timeout"))
            raise TransferBackpressureError(f"decode worker {spec.endpoint} is not draining")
        self._put(("pages", transfer_id, (layer_start, pages, nbytes, spec.endpoint)))

    def finish(self, transfer_id: bytes, first_token_id: int) -> None:
        """All pages are queued: send DONE with the first token and await the ack."""
        self._put(("done", transfer_id, first_token_id))

    def abort(self, transfer_id: bytes, reason: str) -> None:
        """Drop the transfer; the receiver frees its reservation at once."""
        self._put(("abort", transfer_id, reason))

    def pending(self) -> int:
        """Transfers opened and not yet acknowledged or abandoned."""
        return self._budget.num_open()

    # -- sending thread ---------------------------------------------------------------------

    def _put(self, command: tuple[str, bytes, object]) -> None:
        """Queue a command and wake the sending thread (any thread)."""
        self._commands.put(command)
        with contextlib.suppress(BlockingIOError):  # a full pipe wakes the thread anyway
            os.write(self._wake_w, b"\0")

    def _loop(self) -> None:
        """Sleeps in one poll over the peers' sockets and a wake-up pipe: replies and new
        commands are handled as they come, with no busy polling while the engine computes."""
        self._poller.register(self._wake_r, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(self._poller.poll(_IDLE_POLL_MS))
            if self._wake_r in events:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 4096):
                        pass
            try:
                command: tuple[str, bytes, object] | None = self._commands.get_nowait()
            except queue.Empty:
                command = None
            while command is not None:
                try:
                    self._route(command)
                except Exception as exc:  # bad input fails its transfer, never this thread
                    self._fail(command[1], f"error: {exc}")
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            for peer in list(self._peers.values()):
                self._drain(peer)
            self._collect_replies()
            self._expire()
        for peer in self._peers.values():
            peer.sock.close(linger=0)
            if peer.link is not None:
                peer.link.close()

    def _route(self, command: tuple[str, bytes, object]) -> None:
        kind, tid, arg = command
        if kind == "open":
            assert isinstance(arg, TransferSpec)
            self._transfers[tid] = _Transfer(arg, time.monotonic())
            self.stats.transfers_started += 1
        transfer = self._transfers.get(tid)
        if transfer is None:
            if kind == "pages":
                self._release_bytes(arg)
            return
        peer = self._peer(transfer.spec.endpoint)
        peer.backlog.append(command)

    def _peer(self, endpoint: str) -> _Peer:
        peer = self._peers.get(endpoint)
        if peer is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDTIMEO, _SEND_TIMEOUT_MS)
            sock.setsockopt(zmq.SNDHWM, _SNDHWM)
            sock.connect(endpoint)
            peer = _Peer(endpoint, sock)
            self._peers[endpoint] = peer
            self._poller.register(sock, zmq.POLLIN)
        return peer

    def _drain(self, peer: _Peer) -> None:
        if peer.state == "new" and peer.backlog:
            self._hello(peer)
        if peer.state == "refused":
            while peer.backlog:
                kind, tid, arg = peer.backlog.popleft()
                if kind == "pages":
                    self._release_bytes(arg)
                self._fail(tid, f"incompatible: {peer.refusal}")
            peer.state = "new"  # the peer may be reconfigured; try again next time
            return
        while peer.state == "ready" and peer.backlog:
            kind, tid, arg = peer.backlog.popleft()
            try:
                self._execute(peer, kind, tid, arg)
            except (zmq.ZMQError, RuntimeError, OSError) as exc:  # torch.distributed, sockets
                self._fail(tid, f"send_error: {peer.endpoint}: {exc}")
                self._reset(peer)
            except Exception as exc:  # bad input fails its transfer, never this thread
                self._fail(tid, f"error: {exc}")

    def _execute(self, peer: _Peer, kind: str, tid: bytes, arg: object) -> None:
        transfer = self._transfers.get(tid)
        if kind == "pages":
            assert isinstance(arg, tuple)
            try:
                if transfer is not None and transfer.failed is None:
                    self._send_page(peer, transfer, *arg[:2])
            finally:
                self._release_bytes(arg)
        elif transfer is None:
            return
        elif kind == "done":
            assert isinstance(arg, int)
            done = wire.DoneHeader(tid, arg, self.fingerprint.num_layers)
            self._send_frame(peer, wire.encode(done, self._auth))
            transfer.deadline = time.monotonic() + self._ack_timeout
        elif kind == "abort":
            try:
                self._send_frame(peer, wire.encode(wire.AbortHeader(tid, str(arg)), self._auth))
            finally:
                self._fail(tid, f"aborted: {arg}")

    def _send_frame(self, peer: _Peer, frame: bytes) -> None:
        """A transfer's control frame, in order with its pages: on the pair's stream for the
        stream backend, else on the ZeroMQ socket."""
        if isinstance(peer.link, StreamLink):
            peer.link.send_record(frame)
        else:
            peer.sock.send(frame)

    def _send_page(
        self, peer: _Peer, transfer: _Transfer, layer_start: int, pages: torch.Tensor
    ) -> None:
        out_of_band = self.backend.out_of_band
        if self.backend in (Backend.ZMQ, Backend.STREAM) and pages.device.type != "cpu":
            pages = pages.cpu()  # host staging for the socket backends
        pages = pages.contiguous()  # one copy at most (a slice of a prefix-sharing page)
        num_layers, _, _, block_size, kv_heads, head_dim = pages.shape
        header = wire.PageHeader(
            transfer_id=transfer.spec.transfer_id,
            layer_start=layer_start,
            layer_end=layer_start + num_layers,
            block_ids=transfer.spec.block_ids,
            block_size=block_size,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            dtype=pages.dtype,
            payload_nbytes=pages.numel() * pages.element_size(),
            out_of_band=out_of_band,
        )
        payload = tensor_bytes(pages) if pages.device.type == "cpu" else None
        frame = wire.encode(header, self._auth, payload)
        if isinstance(peer.link, StreamLink):
            assert payload is not None
            peer.link.send_record(frame, payload)
        elif out_of_band:
            assert peer.link is not None
            peer.sock.send(frame)
            peer.link.send(pages)
        else:
            assert payload is not None
            peer.sock.send_multipart([frame, payload], copy=False)
        self.stats.pages += 1
        self.stats.bytes += header.payload_nbytes

    def _hello(self, peer: _Peer) -> None:
        peer.hello_id = os.urandom(16)
        peer.hello_deadline = time.monotonic() + self._handshake_timeout
        hello = wire.HandshakeHeader(
            peer.hello_id, wire.FrameKind.HELLO, hello_fields(self.fingerprint)
        )
        peer.sock.send(wire.encode(hello, self._auth))
        peer.state = "handshaking"

    def _collect_replies(self) -> None:
        if not self._peers:
            return
        for sock, _ in self._poller.poll(0):
            peer = next((p for p in self._peers.values() if p.sock is sock), None)
            if peer is None:  # the wake-up pipe
                continue
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    header = wire.decode(frame, self._auth)
                except wire.MalformedFrameError as exc:
                    self.stats.drop(
                        "unauthenticated"
                        if isinstance(exc, wire.UnauthenticatedFrameError)
                        else "malformed"
                    )
                    continue
                if isinstance(header, wire.HandshakeHeader):
                    self._answer(peer, header)
                elif isinstance(header, wire.AckHeader):
                    self._acked(peer, header)

    def _answer(self, peer: _Peer, reply: wire.HandshakeHeader) -> None:
        if peer.state != "handshaking" or reply.transfer_id != peer.hello_id:
            return  # a stale answer
        if reply.kind is wire.FrameKind.REFUSE:
            peer.state, peer.refusal = "refused", str(reply.fields.get("reason", "refused"))
            log.warning("kv_peer_refused_us", endpoint=peer.endpoint, reason=peer.refusal)
            return
        try:
            theirs = Fingerprint.from_fields(reply.fields.get("fingerprint", {}))
            check_match(self.fingerprint, theirs, "decode worker")
            if self.backend.out_of_band:
                peer.link = join_pair(
                    self.backend,
                    reply.fields["rendezvous"],
                    self._handshake_timeout,
                    self._auth.stream_proof,
                )
        except (IncompatiblePeerError, KeyError, RuntimeError, ValueError, OSError) as exc:
            peer.state, peer.refusal = "refused", str(exc)
            return
        peer.state = "ready"
        log.info("kv_peer_ready", endpoint=peer.endpoint, backend=self.backend.value)

    def _acked(self, peer: _Peer, ack: wire.AckHeader) -> None:
        transfer = self._transfers.get(ack.transfer_id)
        if transfer is None or transfer.failed is not None:
            return
        if ack.status is wire.AckStatus.OK:
            self._transfers.pop(ack.transfer_id)
            self.stats.completed(time.monotonic() - transfer.started)
            self._closed(transfer, True, "")
            return
        if ack.message == "handshake required":  # the decode worker restarted
            self._reset(peer)
        self._fail(ack.transfer_id, f"nack: {ack.message}")

    def _expire(self) -> None:
        now = time.monotonic()
        for peer in self._peers.values():
            if peer.state == "handshaking" and peer.hello_deadline <= now:
                peer.state, peer.refusal = "refused", "handshake_timeout: no answer to HELLO"
        for tid, transfer in list(self._transfers.items()):
            if transfer.deadline is not None and transfer.deadline <= now:
                self._fail(tid, f"ack_timeout: no acknowledgement in {self._ack_timeout:.0f}s")

    def _reset(self, peer: _Peer) -> None:
        """Forget a peer's handshake (its process may have restarted); keep its socket."""
        if peer.link is not None:
            peer.link.close()
        peer.state, peer.link = "new", None

    def _fail(self, tid: bytes, reason: str) -> None:
        transfer = self._transfers.pop(tid, None)
        if transfer is None:
            return
        transfer.failed = reason
        self.stats.fail(reason.split(":")[0])
        log.warning("kv_send_failed", request_id=transfer.spec.request_id, reason=reason)
        self._closed(transfer, False, reason)

    def _closed(self, transfer: _Transfer, ok: bool, message: str) -> None:
        self._budget.close(transfer.spec.transfer_id)
        if self._on_sent is not None:
            self._on_sent(transfer.spec.request_id, ok, message)

    def _release_bytes(self, arg: object) -> None:
        """A pages command left the queue (sent or dropped): its bytes leave the budget."""
        assert isinstance(arg, tuple)
        _, _, nbytes, endpoint = arg
        self._budget.release(endpoint, nbytes)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
