"""A decode worker as the sender's thread sees it: its socket, handshake and pair link.

A :class:`Peer` moves only along :class:`PeerState`'s allowed moves (anything else is an
internal error); frames go out only once it is HANDSHAKEN. Its socket's monitor tells when a
connection dropped (the decode worker died or restarted on the same endpoint), and so does a
pair stream the decode side closed: ZeroMQ reconnects by itself, but the new connection is a
stranger to the receiver, so the handshake must be made again before anything else is sent. A
transfer's control frames take the path its pages take (the pair's stream for the stream
backend, else the ZeroMQ socket), so they stay in order. Only the sending thread touches a peer.
"""

from __future__ import annotations

import collections
import enum
import os
import time
from dataclasses import dataclass, field

import structlog
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from core.ticket import Fingerprint, IncompatiblePeerError, check_match
from kvtransfer import wire
from kvtransfer.datapath import Backend, PairLink, StreamLink, join_pair, tensor_bytes
from kvtransfer.handshake import hello_fields, peer_fingerprint
from kvtransfer.send_budget import TransferSpec
from kvtransfer.send_commands import Command

__all__ = ["Peer", "PeerState"]

log = structlog.get_logger(__name__)

_SEND_TIMEOUT_MS = 10_000
_CONNECT_TIMEOUT_MS = 2_000  # an unanswered connect is retried, not left to SYN backoff
_SNDHWM = 64


class PeerState(enum.Enum):
    """A decode worker's handshake, as this sender sees it."""

    NEW = "new"  # no handshake: never tried, or forgotten (the peer may have restarted)
    CONNECTING = "connecting"  # HELLO sent; awaiting WELCOME or REFUSE until the deadline
    HANDSHAKEN = "handshaken"  # WELCOME matched (and the pair link joined): frames may go
    FAILED = "failed"  # refused or unanswered: its backlog fails, then it is NEW again

    def may_become(self, state: PeerState) -> bool:
        return state in _PEER_MOVES[self]


# Any state may fall back to NEW (a send error, a lost connection or a "handshake required" nack
# forgets the peer).
_PEER_MOVES: dict[PeerState, frozenset[PeerState]] = {
    PeerState.NEW: frozenset({PeerState.NEW, PeerState.CONNECTING}),
    PeerState.CONNECTING: frozenset({PeerState.NEW, PeerState.HANDSHAKEN, PeerState.FAILED}),
    PeerState.HANDSHAKEN: frozenset({PeerState.NEW}),
    PeerState.FAILED: frozenset({PeerState.NEW}),
}


@dataclass
class Peer:
    endpoint: str
    sock: zmq.Socket[bytes]
    state: PeerState = PeerState.NEW
    hello_id: bytes = b""
    hello_deadline: float = 0.0
    refusal: str = ""  # why the handshake failed (FAILED)
    link: PairLink | None = None  # out-of-band backends: the pair's payload channel
    backlog: collections.deque[Command] = field(default_factory=collections.deque)
    monitor: zmq.Socket[bytes] | None = None  # the socket's EVENT_DISCONNECTED events

    @classmethod
    def connect(cls, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> Peer:
        """A NEW peer on a DEALER socket of its own, connecting to ``endpoint``, whose
        dropped connections are watched (see :meth:`lost_connection`)."""
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, _SEND_TIMEOUT_MS)
        sock.setsockopt(zmq.SNDHWM, _SNDHWM)
        sock.setsockopt(zmq.CONNECT_TIMEOUT, _CONNECT_TIMEOUT_MS)
        sock.connect(endpoint)
        peer = cls(endpoint, sock)
        peer.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        return peer

    def lost_connection(self) -> bool:
        """Whether a connection of the socket dropped since the last call, or the decode side
        closed the pair's stream (it never writes on it: readable means closed). The stream
        tells even when the socket's connection outlived the restart (a relay in front, or a
        monitor event not in yet)."""
        lost = isinstance(self.link, StreamLink) and self.link.readable()
        while self.monitor is not None:
            try:
                recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            lost = True  # only EVENT_DISCONNECTED is watched
        return lost

    def close(self) -> None:
        """Close the socket, its monitor and the pair link (the sending thread is ending)."""
        if self.monitor is not None:
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
        self.sock.close(linger=0)
        if self.link is not None:
            self.link.close()

    def move(self, state: PeerState, refusal: str = "") -> None:
        assert self.state.may_become(state), f"peer {self.state.name} -> {state.name}"
        self.state, self.refusal = state, refusal

    # -- the handshake ----------------------------------------------------------------------

    def greet(
        self, fingerprint: Fingerprint, auth: wire.FrameAuth, timeout_s: float, sender: str
    ) -> None:
        """Send HELLO (naming ``sender``, see ``kvtransfer.handshake``); the peer is
        CONNECTING until its answer or ``timeout_s``."""
        self.hello_id = os.urandom(16)
        self.hello_deadline = time.monotonic() + timeout_s
        fields = hello_fields(fingerprint, sender=sender)
        hello = wire.HandshakeHeader(self.hello_id, wire.FrameKind.HELLO, fields)
        self.sock.send(wire.encode(hello, auth))
        self.move(PeerState.CONNECTING)

    def answer(
        self,
        reply: wire.HandshakeHeader,
        fingerprint: Fingerprint,
        auth: wire.FrameAuth,
        timeout_s: float,
    ) -> None:
        """WELCOME or REFUSE to our HELLO: HANDSHAKEN (pair link joined) or FAILED; an answer
        to another HELLO, or when none is awaited, is stale and ignored."""
        if self.state is not PeerState.CONNECTING or reply.transfer_id != self.hello_id:
            return  # a stale answer
        if reply.kind is wire.FrameKind.REFUSE:
            self.move(PeerState.FAILED, str(reply.fields.get("reason", "refused")))
            log.warning("kv_peer_refused_us", endpoint=self.endpoint, reason=self.refusal)
            return
        backend = Backend(fingerprint.backend)
        try:
            theirs = peer_fingerprint(reply.fields)
            check_match(fingerprint, theirs, "decode worker")
            if backend.out_of_band:
                self.link = join_pair(
                    backend, reply.fields["rendezvous"], timeout_s, auth.stream_proof
                )
        except (  # a rendezvous that is not an object, or a port past 65535: no handshake
            IncompatiblePeerError,
            KeyError,
            RuntimeError,
            ValueError,
            OSError,
            TypeError,
            OverflowError,
        ) as exc:
            self.move(PeerState.FAILED, str(exc))
            return
        self.move(PeerState.HANDSHAKEN)
        log.info("kv_peer_ready", endpoint=self.endpoint, backend=backend.value)

    def reset(self) -> None:
        """Forget the handshake (the peer's process may have restarted); keep the socket."""
        if self.link is not None:
            self.link.close()
        self.link = None
        self.move(PeerState.NEW)

    # -- frames on a handshaken peer's wire -------------------------------------------------

    def send_frame(self, frame: bytes) -> None:
        """A transfer's control frame, in order with its pages: on the pair's stream for the
        stream backend, else on the ZeroMQ socket."""
        if isinstance(self.link, StreamLink):
            self.link.send_record(frame)
        else:
            self.sock.send(frame)

    def send_page(
        self,
        backend: Backend,
        auth: wire.FrameAuth,
        spec: TransferSpec,
        layer_start: int,
        pages: torch.Tensor,
    ) -> int:
        """One PAGE frame and its payload (encrypted on an encrypting channel), where
        ``backend`` carries payloads; returns the payload's bytes."""
        out_of_band = backend.out_of_band
        if backend in (Backend.ZMQ, Backend.STREAM) and pages.device.type != "cpu":
            pages = pages.cpu()  # host staging for the socket backends
        pages = pages.contiguous()  # one copy at most (a slice of a prefix-sharing page)
        num_layers, _, _, block_size, kv_heads, head_dim = pages.shape
        header = wire.PageHeader(
            transfer_id=spec.transfer_id,
            layer_start=layer_start,
            layer_end=layer_start + num_layers,
            block_ids=spec.block_ids,
            block_size=block_size,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            dtype=pages.dtype,
            payload_nbytes=pages.numel() * pages.element_size(),
            out_of_band=out_of_band,
        )
        plain = tensor_bytes(pages) if pages.device.type == "cpu" else None
        frame, payload = wire.seal(header, auth, plain)  # the ciphertext, if encrypting
        if isinstance(self.link, StreamLink):
            assert isinstance(payload, memoryview)
            self.link.send_record(frame, payload)
        elif out_of_band:
            assert self.link is not None and not auth.encrypt  # refused by TransferConfig
            self.sock.send(frame)
            self.link.send(pages)
        else:
            assert isinstance(payload, memoryview)
            self.sock.send_multipart([frame, payload], copy=False)
        return header.payload_nbytes
