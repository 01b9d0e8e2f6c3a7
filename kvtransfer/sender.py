"""Prefill side of the KV channel: pushes pages to decode workers, layer by layer.

The owner calls :meth:`KVSender.open`, :meth:`KVSender.send_pages` (per layer or once),
then :meth:`KVSender.finish` or :meth:`KVSender.abort`; each only queues a typed command
(:data:`Command`). One thread owns every socket and each peer's :class:`PeerState`; a
peer's commands run in the order queued, only once it is HANDSHAKEN. A transfer ends once:
acknowledged, or failed (refused peer, send error, lost connection, nack, ack
timeout, abort). One that fails here after frames of it went out, without the decode worker
having said so (a lost connection, an ack timeout, a "handshake required" nack, a send error),
is retracted: an ABORT for it follows on the peer's next handshake, which begins at once, so
the decode worker frees its reservation now, not at its lease. An ack timeout also replaces
the peer's socket (a fresh connection, not one stuck in TCP's retransmission backoff).
``send_pages`` blocks while its peer is over ``max_queued_bytes`` (:class:`SendBudget`). The
commands are ``kvtransfer.send_commands``'s, a peer's handshake and wire
``kvtransfer.send_peer``'s.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import assert_never

import structlog
import torch
import zmq

from core.ticket import Fingerprint
from kvtransfer import wire
from kvtransfer.datapath import Backend, refuse_encryption
from kvtransfer.metrics import TransferStats
from kvtransfer.send_budget import SendBudget, TransferBackpressureError, TransferSpec, check_pages
from kvtransfer.send_commands import Abort, Command, Finish, Open, Retract, SendPages
from kvtransfer.send_peer import Peer, PeerState
from kvtransfer.staging import stager_for

__all__ = ["KVSender", "SentCallback", "TransferBackpressureError", "TransferSpec"]

log = structlog.get_logger(__name__)

SentCallback = Callable[[str, bool, str], None]  # (request_id, ok, message)

_IDLE_POLL_MS = 50  # deadline checks (acks, handshakes) run at least this often
DEFAULT_MAX_QUEUED_BYTES = 512 << 20


@dataclass
class _Transfer:
    spec: TransferSpec
    started: float
    deadline: float | None = None  # set once DONE is sent
    failed: str | None = None
    sent: bool = False  # some frame of it went out (on the connection of that time)


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
        refuse_encryption(self.backend, auth)
        self._auth = auth
        self._ack_timeout = ack_timeout_s
        self._handshake_timeout = handshake_timeout_s
        self._on_sent = on_sent
        self._sender_id = os.urandom(8).hex()  # names this sender in its HELLOs
        self._commands: queue.Queue[Command] = queue.Queue()
        self._transfers: dict[bytes, _Transfer] = {}  # owned by the sending thread
        self._peers: dict[str, Peer] = {}
        self._poller = zmq.Poller()
        self._wake_r, self._wake_w = os.pipe()  # closed with the sender, never before
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._budget = SendBudget(max_queued_bytes)
        self._stager = stager_for(self.backend, max_queued_bytes)  # CUDA pages to the host
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
        staged = None if self._stager is None else self._stager.try_stage(pages)  # never waits
        self._put(SendPages(transfer_id, layer_start, pages, nbytes, spec.endpoint, staged))

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
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                try:
                    self._route(command)
                except Exception as exc:  # bad input fails its transfer, never this thread
                    self._fail(command.transfer_id, f"error: {exc}")
            for peer in list(self._peers.values()):
                if peer.lost_connection():
                    self._lost(peer)
                self._drain(peer)
            self._collect_replies()
            self._expire()
        for peer in self._peers.values():
            peer.close()

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

    def _peer(self, endpoint: str) -> Peer:
        peer = self._peers.get(endpoint)
        if peer is None:
            peer = Peer.connect(self._ctx, endpoint)
            self._peers[endpoint] = peer
            self._poller.register(peer.sock, zmq.POLLIN)
        return peer

    def _drain(self, peer: Peer) -> None:
        """Run what the peer's state allows: a NEW peer with work is greeted; a FAILED one
        fails its backlog (and, with no transfer to it left open, is dropped); a HANDSHAKEN
        one sends it, in order."""
        if peer.state is PeerState.NEW and peer.backlog:
            peer.greet(self.fingerprint, self._auth, self._handshake_timeout, self._sender_id)
        if peer.state is PeerState.FAILED:
            while peer.backlog:
                command = peer.backlog.popleft()
                if isinstance(command, SendPages):
                    self._release_bytes(command)
                self._fail(command.transfer_id, f"incompatible: {peer.refusal}")
            peer.move(PeerState.NEW)  # the peer may be reconfigured; try again next time
            if not any(t.spec.endpoint == peer.endpoint for t in self._transfers.values()):
                self._drop(peer)  # nothing awaits it: a ticket's bad endpoint keeps no socket
            return
        while peer.state is PeerState.HANDSHAKEN and peer.backlog:
            command = peer.backlog.popleft()
            try:
                self._execute(peer, command)
            except (zmq.ZMQError, RuntimeError, OSError) as exc:  # torch.distributed, sockets
                peer.reset()
                self._retract(command.transfer_id, f"send_error: {peer.endpoint}: {exc}")
            except Exception as exc:  # bad input fails its transfer, never this thread
                self._retract(command.transfer_id, f"error: {exc}")

    def _execute(self, peer: Peer, command: Command) -> None:
        """One command on a handshaken peer's wire."""
        tid = command.transfer_id
        transfer = self._transfers.get(tid)
        match command:
            case SendPages(layer_start=layer_start):
                try:
                    if transfer is not None and transfer.failed is None:
                        transfer.sent = True
                        nbytes = peer.send_page(
                            self.backend, self._auth, transfer.spec, layer_start, command.ready()
                        )
                        self.stats.pages += 1
                        self.stats.bytes += nbytes
                finally:
                    self._release_bytes(command)
            case Open():
                pass  # its work was the handshake
            case Finish(first_token_id=first_token_id):
                if transfer is None:
                    return
                done = wire.DoneHeader(tid, first_token_id, self.fingerprint.num_layers)
                transfer.sent = True
                peer.send_frame(wire.encode(done, self._auth))
                transfer.deadline = time.monotonic() + self._ack_timeout
            case Abort(reason=reason):
                if transfer is None:
                    return
                try:
                    peer.send_frame(wire.encode(wire.AbortHeader(tid, reason), self._auth))
                finally:
                    self._fail(tid, f"aborted: {reason}")
            case Retract(reason=reason):  # the transfer already ended here
                peer.send_frame(wire.encode(wire.AbortHeader(tid, reason), self._auth))
                log.info("kv_send_retracted", endpoint=peer.endpoint, reason=reason)
            case _:
                assert_never(command)

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

    def _answer(self, peer: Peer, reply: wire.HandshakeHeader) -> None:
        peer.answer(reply, self.fingerprint, self._auth, self._handshake_timeout)

    def _acked(self, peer: Peer, ack: wire.AckHeader) -> None:
        transfer = self._transfers.get(ack.transfer_id)
        if transfer is None or transfer.failed is not None:
            return
        if ack.status is wire.AckStatus.OK:
            self._transfers.pop(ack.transfer_id)
            self.stats.completed(time.monotonic() - transfer.started)
            self._closed(transfer, True, "")
            return
        if ack.message == wire.HANDSHAKE_REQUIRED:  # the decode worker restarted
            # its frames were dropped, not its reservation: abort that after a new handshake
            peer.reset()
            self._retract(ack.transfer_id, f"nack: {ack.message}")
            return
        self._fail(ack.transfer_id, f"nack: {ack.message}")

    def _expire(self) -> None:
        now = time.monotonic()
        for peer in self._peers.values():
            if peer.state is PeerState.CONNECTING and peer.hello_deadline <= now:
                peer.move(PeerState.FAILED, "handshake_timeout: no answer to HELLO")
        stalled: set[str] = set()
        for tid, transfer in list(self._transfers.items()):
            if transfer.deadline is not None and transfer.deadline <= now:
                stalled.add(transfer.spec.endpoint)
                self._retract(tid, f"ack_timeout: no acknowledgement in {self._ack_timeout:g}s")
        for endpoint in stalled:
            if endpoint in self._peers:
                self._reconnect(self._peers[endpoint])

    def _reconnect(self, peer: Peer) -> None:
        """Replace a stalled peer's socket with a fresh one (its backlog moves over): after a
        long partition the old connection would hold new frames behind TCP's retransmission
        backoff. Frames sent on the old one are abandoned with it, so their transfers fail and
        are retracted on the new one."""
        log.info("kv_peer_reconnecting", endpoint=peer.endpoint)
        self._drop(peer)
        self._peer(peer.endpoint).backlog = peer.backlog
        self._fail_sent_to(peer.endpoint, "reconnected after an ack timeout")

    def _lost(self, peer: Peer) -> None:
        """A connection to the peer dropped (its process died, or restarted on the endpoint):
        its handshake is forgotten, so its backlog waits for a new one (a transfer with nothing
        sent yet goes on unharmed); a transfer with frames sent over the lost connection fails
        now, not at its ack timeout."""
        if peer.state not in (PeerState.CONNECTING, PeerState.HANDSHAKEN):
            return
        log.info("kv_peer_connection_lost", endpoint=peer.endpoint)
        peer.reset()
        self._fail_sent_to(peer.endpoint, "the decode worker restarted?")

    def _fail_sent_to(self, endpoint: str, why: str) -> None:
        """Fail (and retract) every transfer to ``endpoint`` with frames out on a connection
        that is gone."""
        for tid, transfer in list(self._transfers.items()):
            if transfer.sent and transfer.spec.endpoint == endpoint:
                self._retract(tid, f"connection_lost: {endpoint} ({why})")

    def _drop(self, peer: Peer) -> None:
        """Close a peer's socket and forget it (the next transfer to it starts afresh)."""
        del self._peers[peer.endpoint]
        self._poller.unregister(peer.sock)
        peer.close()

    def _retract(self, tid: bytes, reason: str) -> None:
        """Fail a transfer the decode worker may still hold a reservation for; if frames of it
        went out, queue an ABORT for it first in its peer's backlog (a peer not handshaken
        begins a handshake for it at once; one that fails to drops it)."""
        transfer = self._transfers.get(tid)
        if transfer is None:
            return
        self._fail(tid, reason)
        if transfer.sent:
            self._peer(transfer.spec.endpoint).backlog.appendleft(Retract(tid, reason))

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
        command.release_staged()


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
