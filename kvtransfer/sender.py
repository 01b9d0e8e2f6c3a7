"""Prefill side of the KV channel: pushes pages to decode workers, layer by layer.

The owner calls :meth:`KVSender.open`, :meth:`KVSender.send_pages` (per layer or once),
then :meth:`KVSender.finish` or :meth:`KVSender.abort`; each only queues a typed command
(:data:`Command`). One thread owns every socket and each peer's :class:`PeerState`; a
peer's commands run in the order queued, only once it is HANDSHAKEN. A transfer ends once:
acknowledged, or failed (refused peer, send error, nack, ack timeout, abort). ``send_pages``
blocks while its peer is over ``max_queued_bytes`` (:class:`SendBudget`).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeAlias, assert_never

import structlog
import torch
import zmq

from core.ticket import Fingerprint, IncompatiblePeerError, check_match
from kvtransfer import wire
from kvtransfer.datapath import Backend, PairLink, StreamLink, join_pair, tensor_bytes
from kvtransfer.handshake import hello_fields
from kvtransfer.metrics import TransferStats
from kvtransfer.send_budget import SendBudget, TransferSpec, check_pages

__all__ = [
    "Abort",
    "Command",
    "Finish",
    "KVSender",
    "Open",
    "PeerState",
    "SendPages",
    "SentCallback",
    "TransferBackpressureError",
    "TransferSpec",
]

log = structlog.get_logger(__name__)

SentCallback = Callable[[str, bool, str], None]  # (request_id, ok, message)

_SEND_TIMEOUT_MS = 10_000
_SNDHWM = 64
_IDLE_POLL_MS = 50  # deadline checks (acks, handshakes) run at least this often
DEFAULT_MAX_QUEUED_BYTES = 512 << 20


class TransferBackpressureError(Exception):
    """The peer did not drain its queue in time; the transfer was aborted."""


# -- commands: what the owner's calls queue for the sending thread -----------------------------


@dataclass(frozen=True)
class Open:
    """Start a transfer (its peer's handshake, if new, begins with it)."""

    spec: TransferSpec

    @property
    def transfer_id(self) -> bytes:
        return self.spec.transfer_id


@dataclass(frozen=True, eq=False)
class SendPages:
    """Pages ``(L', 2, n, bs, KVH, D)`` for layers from ``layer_start``, already checked and
    counted as ``nbytes`` queued for ``endpoint`` in the :class:`SendBudget`: whoever takes
    this command off a queue (sent or dropped) releases them."""

    transfer_id: bytes
    layer_start: int
    pages: torch.Tensor
    nbytes: int
    endpoint: str


@dataclass(frozen=True)
class Finish:
    """Every page is queued: send DONE with the first token, then await the ack."""

    transfer_id: bytes
    first_token_id: int


@dataclass(frozen=True)
class Abort:
    """Drop the transfer and tell the peer (its reservation is freed at once)."""

    transfer_id: bytes
    reason: str


Command: TypeAlias = Open | SendPages | Finish | Abort


class PeerState(enum.Enum):
    """A decode worker's handshake, as this sender sees it."""

    NEW = "new"  # no handshake: never tried, or forgotten (the peer may have restarted)
    CONNECTING = "connecting"  # HELLO sent; awaiting WELCOME or REFUSE until the deadline
    HANDSHAKEN = "handshaken"  # WELCOME matched (and the pair link joined): frames may go
    FAILED = "failed"  # refused or unanswered: its backlog fails, then it is NEW again

    def may_become(self, state: PeerState) -> bool:
        return state in _PEER_MOVES[self]


# Any state may fall back to NEW (a send error or a "handshake required" nack forgets the peer).
_PEER_MOVES: dict[PeerState, frozenset[PeerState]] = {
    PeerState.NEW: frozenset({PeerState.NEW, PeerState.CONNECTING}),
    PeerState.CONNECTING: frozenset({PeerState.NEW, PeerState.HANDSHAKEN, PeerState.FAILED}),
    PeerState.HANDSHAKEN: frozenset({PeerState.NEW}),
    PeerState.FAILED: frozenset({PeerState.NEW}),
}


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
    state: PeerState = PeerState.NEW
    hello_id: bytes = b""
    hello_deadline: float = 0.0
    refusal: str = ""  # why the handshake failed (FAILED)
    link: PairLink | None = None  # out-of-band backends: the pair's payload channel
    backlog: collections.deque[Command] = field(default_factory=collections.deque)

    def move(self, state: PeerState, refusal: str = "") -> None:
        assert self.state.may_become(state), f"peer {self.state.name} -> {state.name}"
        self.state, self.refusal = state, refusal


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
        self._commands: queue.Queue[Command] = queue.Queue()
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
        self._put(Open(spec))

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
            self._put(Abort(transfer_id, f"invalid pages: {exc}"))
            raise
        nbytes = pages.numel() * pages.element_size()
        # the decode worker's ZeroMQ high-water mark bounds what is on the wire, this budget
        # what waits here: a slow decode worker slows its prefill workers instead of growing
        # their memory without bound
        if not self._budget.reserve(spec.endpoint, nbytes, self._ack_timeout, self._stop):
            self._put(Abort(transfer_id, "backpressure timeout"))
            raise TransferBackpressureError(f"decode worker {spec.endpoint} is not draining")
        self._put(SendPages(transfer_id, layer_start, pages, nbytes, spec.endpoint))

    def finish(self, transfer_id: bytes, first_token_id: int) -> None:
        """All pages are queued: send DONE with the first token and await the ack."""
        self._put(Finish(transfer_id, first_token_id))

    def abort(self, transfer_id: bytes, reason: str) -> None:
        """Drop the transfer; the receiver frees its reservation at once."""
        self._put(Abort(transfer_id, reason))

    def pending(self) -> int:
        """Transfers opened and not yet acknowledged or abandoned."""
        return self._budget.num_open()

    # -- sending thread ---------------------------------------------------------------------

    def _put(self, command: Command) -> None:
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
                command: Command | None = self._commands.get_nowait()
            except queue.Empty:
                command = None
            while command is not None:
                try:
                    self._route(command)
                except Exception as exc:  # bad input fails its transfer, never this thread
                    self._fail(command.transfer_id, f"error: {exc}")
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

    def _route(self, command: Command) -> None:
        """Hand a command to its transfer's peer, in order; a command for a transfer that
        already ended is dropped (its pages' bytes leave the budget)."""
        if isinstance(command, Open):
            self._transfers[command.transfer_id] = _Transfer(command.spec, time.monotonic())
            self.stats.transfers_started += 1
        transfer = self._transfers.get(command.transfer_id)
        if transfer is None:
            if isinstance(command, SendPages):
                self._release_bytes(command)
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
        """Run what the peer's state allows: a NEW peer with work is greeted; a FAILED one
        fails its backlog; a HANDSHAKEN one sends it, in order."""
        if peer.state is PeerState.NEW and peer.backlog:
            self._hello(peer)
        if peer.state is PeerState.FAILED:
            while peer.backlog:
                command = peer.backlog.popleft()
                if isinstance(command, SendPages):
                    self._release_bytes(command)
                self._fail(command.transfer_id, f"incompatible: {peer.refusal}")
            peer.move(PeerState.NEW)  # the peer may be reconfigured; try again next time
            return
        while peer.state is PeerState.HANDSHAKEN and peer.backlog:
            command = peer.backlog.popleft()
            try:
                self._execute(peer, command)
            except (zmq.ZMQError, RuntimeError, OSError) as exc:  # torch.distributed, sockets
                self._fail(command.transfer_id, f"send_error: {peer.endpoint}: {exc}")
                self._reset(peer)
            except Exception as exc:  # bad input fails its transfer, never this thread
                self._fail(command.transfer_id, f"error: {exc}")

    def _execute(self, peer: _Peer, command: Command) -> None:
        """One command on a handshaken peer's wire."""
        tid = command.transfer_id
        transfer = self._transfers.get(tid)
        match command:
            case SendPages(layer_start=layer_start, pages=pages):
                try:
                    if transfer is not None and transfer.failed is None:
                        self._send_page(peer, transfer, layer_start, pages)
                finally:
                    self._release_bytes(command)
            case Open():
                pass  # its work was the handshake
            case Finish(first_token_id=first_token_id):
                if transfer is None:
                    return
                done = wire.DoneHeader(tid, first_token_id, self.fingerprint.num_layers)
                self._send_frame(peer, wire.encode(done, self._auth))
                transfer.deadline = time.monotonic() + self._ack_timeout
            case Abort(reason=reason):
                if transfer is None:
                    return
                try:
                    self._send_frame(peer, wire.encode(wire.AbortHeader(tid, reason), self._auth))
                finally:
                    self._fail(tid, f"aborted: {reason}")
            case _:
                assert_never(command)

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
        peer.move(PeerState.CONNECTING)

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
        if peer.state is not PeerState.CONNECTING or reply.transfer_id != peer.hello_id:
            return  # a stale answer
        if reply.kind is wire.FrameKind.REFUSE:
            peer.move(PeerState.FAILED, str(reply.fields.get("reason", "refused")))
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
            peer.move(PeerState.FAILED, str(exc))
            return
        peer.move(PeerState.HANDSHAKEN)
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
        if ack.message == wire.HANDSHAKE_REQUIRED:  # the decode worker restarted
            self._reset(peer)
        self._fail(ack.transfer_id, f"nack: {ack.message}")

    def _expire(self) -> None:
        now = time.monotonic()
        for peer in self._peers.values():
            if peer.state is PeerState.CONNECTING and peer.hello_deadline <= now:
                peer.move(PeerState.FAILED, "handshake_timeout: no answer to HELLO")
        for tid, transfer in list(self._transfers.items()):
            if transfer.deadline is not None and transfer.deadline <= now:
                self._fail(tid, f"ack_timeout: no acknowledgement in {self._ack_timeout:.0f}s")

    def _reset(self, peer: _Peer) -> None:
        """Forget a peer's handshake (its process may have restarted); keep its socket."""
        if peer.link is not None:
            peer.link.close()
        peer.link = None
        peer.move(PeerState.NEW)

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

    def _release_bytes(self, command: SendPages) -> None:
        """A pages command left the queue (sent or dropped): its bytes leave the budget."""
        self._budget.release(command.endpoint, command.nbytes)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
