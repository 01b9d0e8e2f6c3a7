"""kvtransfer.sender's typed commands (``send_commands``) and peer states (``send_peer``),
driven without a sending thread."""

from __future__ import annotations

import dataclasses
import queue
from collections.abc import Iterator

import pytest
import torch

from core.ticket import Fingerprint
from kvtransfer import wire
from kvtransfer.send_peer import Peer
from kvtransfer.sender import (
    Abort,
    Command,
    Finish,
    KVSender,
    Open,
    PeerState,
    SendPages,
    TransferSpec,
)

SPEC = TransferSpec("req", b"t" * 16, "tcp://127.0.0.1:9", (3, 4))
FINGERPRINT = Fingerprint(
    model="m",
    dtype="float32",
    block_size=4,
    num_layers=3,
    num_kv_heads=2,
    head_dim=8,
    backend="zmq",
)


@pytest.fixture
def sender() -> Iterator[tuple[KVSender, list[tuple[str, bool, str]]]]:
    sent: list[tuple[str, bool, str]] = []
    kv = KVSender(
        FINGERPRINT,
        wire.FrameAuth(None),
        ack_timeout_s=0.05,
        on_sent=lambda *args: sent.append(args),
    )
    yield kv, sent
    for peer in kv._peers.values():  # never started: its thread would close them
        peer.sock.close(linger=0)


def _queued(kv: KVSender) -> list[Command]:
    commands = []
    while True:
        try:
            commands.append(kv._commands.get_nowait())
        except queue.Empty:
            return commands


def _state(peer: Peer) -> PeerState:
    return peer.state  # read afresh (mypy would narrow ``peer.state`` across calls)


def _pages(layers: int = 1) -> torch.Tensor:
    return torch.zeros((layers, 2, 2, 4, 2, 8))


def test_each_public_call_queues_its_command(sender: tuple[KVSender, list]) -> None:
    kv, _ = sender
    tid = SPEC.transfer_id
    kv.open(SPEC)
    pages = _pages(2)
    kv.send_pages(tid, 1, pages)
    kv.finish(tid, 7)
    kv.abort(tid, "cancelled")
    opened, paged, finished, aborted = _queued(kv)
    assert opened == Open(SPEC) and opened.transfer_id == tid
    assert isinstance(paged, SendPages) and paged.pages is pages
    assert (paged.transfer_id, paged.layer_start, paged.endpoint) == (tid, 1, SPEC.endpoint)
    assert paged.nbytes == pages.numel() * 4 == kv._budget.queued(SPEC.endpoint)
    assert finished == Finish(tid, 7)
    assert aborted == Abort(tid, "cancelled")


def test_invalid_pages_queue_an_abort_and_raise(sender: tuple[KVSender, list]) -> None:
    kv, _ = sender
    kv.open(SPEC)
    with pytest.raises(ValueError, match="out of range"):
        kv.send_pages(SPEC.transfer_id, 2, _pages(2))
    _, aborted = _queued(kv)
    assert isinstance(aborted, Abort) and aborted.reason.startswith("invalid pages: ")
    assert kv._budget.queued(SPEC.endpoint) == 0  # nothing was reserved for them


def test_pages_for_an_unknown_transfer_are_dropped_quietly(sender: tuple[KVSender, list]) -> None:
    kv, _ = sender
    kv.send_pages(SPEC.transfer_id, 0, _pages())
    assert _queued(kv) == []


def test_commands_are_frozen() -> None:
    command = Finish(SPEC.transfer_id, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        command.first_token_id = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("start", "allowed"),
    [
        (PeerState.NEW, {PeerState.NEW, PeerState.CONNECTING}),
        (PeerState.CONNECTING, {PeerState.NEW, PeerState.HANDSHAKEN, PeerState.FAILED}),
        (PeerState.HANDSHAKEN, {PeerState.NEW}),
        (PeerState.FAILED, {PeerState.NEW}),
    ],
)
def test_peer_moves(start: PeerState, allowed: set[PeerState]) -> None:
    assert {state for state in PeerState if start.may_become(state)} == allowed


def test_an_illegal_move_is_an_internal_error(sender: tuple[KVSender, list]) -> None:
    kv, _ = sender
    peer: Peer = kv._peer(SPEC.endpoint)
    assert _state(peer) is PeerState.NEW
    with pytest.raises(AssertionError, match="NEW -> HANDSHAKEN"):
        peer.move(PeerState.HANDSHAKEN)  # only a WELCOME to our HELLO gets there


def test_an_unanswered_hello_fails_the_backlog_and_frees_its_bytes(
    sender: tuple[KVSender, list],
) -> None:
    kv, sent = sender
    kv._handshake_timeout = 0.0
    kv.open(SPEC)
    kv.send_pages(SPEC.transfer_id, 0, _pages())
    for command in _queued(kv):
        kv._route(command)
    peer = kv._peers[SPEC.endpoint]
    assert len(peer.backlog) == 2 and kv._budget.queued(SPEC.endpoint) > 0
    kv._drain(peer)  # NEW with work: HELLO goes out (queued by ZeroMQ, nobody listens)
    assert _state(peer) is PeerState.CONNECTING
    kv._expire()
    assert _state(peer) is PeerState.FAILED
    reason = peer.refusal
    assert reason.startswith("handshake_timeout")
    kv._drain(peer)
    assert _state(peer) is PeerState.NEW and not peer.backlog  # tried again on the next transfer
    assert sent == [("req", False, f"incompatible: {reason}")]  # once, though two commands
    assert kv._budget.queued(SPEC.endpoint) == 0 and kv.pending() == 0


def test_a_stale_answer_leaves_the_peer_alone(sender: tuple[KVSender, list]) -> None:
    kv, _ = sender
    peer = kv._peer(SPEC.endpoint)
    peer.move(PeerState.CONNECTING)
    peer.hello_id = b"h" * 16
    welcome = wire.HandshakeHeader(b"x" * 16, wire.FrameKind.REFUSE, {"reason": "no"})
    kv._answer(peer, welcome)
    assert _state(peer) is PeerState.CONNECTING
    kv._answer(peer, dataclasses.replace(welcome, transfer_id=peer.hello_id))
    assert _state(peer) is PeerState.FAILED and peer.refusal == "no"


def test_a_welcome_with_a_matching_fingerprint_handshakes(sender: tuple[KVSender, list]) -> None:
    kv, _ = sender
    peer = kv._peer(SPEC.endpoint)
    peer.move(PeerState.CONNECTING)
    peer.hello_id = b"h" * 16
    fields = {"fingerprint": FINGERPRINT.to_fields()}
    kv._answer(peer, wire.HandshakeHeader(peer.hello_id, wire.FrameKind.WELCOME, fields))
    assert _state(peer) is PeerState.HANDSHAKEN
    peer.reset()  # e.g. a send error: forget the handshake, keep the socket
    assert _state(peer) is PeerState.NEW and peer.link is None
