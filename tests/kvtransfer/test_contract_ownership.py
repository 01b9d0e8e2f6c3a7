"""Contract, part 9: a reservation belongs to the sender that first wrote to it. Frames for it
from any other peer (a stranger replaying frames it captured from the live transfer, with the
fleet's key or without it; another handshaken sender) are dropped and counted, never fail it:
the genuine sender's transfer completes with its own bytes. The sender that owns it may end it
from a new connection (see ``test_contract_links.py``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kvtransfer import wire
from tests.kvtransfer.harness import (
    KEY,
    LAYERS,
    NOBODY,
    Channel,
    RawPeer,
    random_pages,
    same_bits,
    tid,
)

GMAC = wire.FrameAuth(KEY)
LEASE_S = 60.0
BLOCKS = [3, 5]

pytestmark = pytest.mark.parametrize("transport", ["tcp", "stream", "gloo"], indirect=True)


def genuine_rest(ch: Channel, genuine: RawPeer, pages: torch.Tensor) -> None:
    """The genuine sender's layers after the first, and DONE: the transfer completes."""
    for layer in range(1, LAYERS):
        genuine.send_page(*genuine.page(tid(1), pages[layer : layer + 1], BLOCKS, layer))
    genuine.done(tid(1))
    ack = genuine.recv_ack()
    assert ack.transfer_id == tid(1) and ack.status is wire.AckStatus.OK, ack
    assert ch.rec.wait_ready("req") == 7


def answers(peer: RawPeer) -> list[wire.AckHeader]:
    """Once the receiver has handled all ``peer`` sent: the acks it sent it meanwhile."""
    peer.done(NOBODY)
    acks = []
    while (ack := peer.recv_ack()).transfer_id != NOBODY:
        acks.append(ack)
    return acks


def test_a_stranger_replaying_the_live_transfer_never_fails_it(
    make_channel: Callable[..., Channel],
) -> None:
    """Frames of the live transfer, byte for byte, sent again from a connection that never
    handshook (with the fleet's key a replay is all a stranger can send that verifies)."""
    ch = make_channel(receiver_auth=GMAC, sender=False)
    genuine, stranger = ch.raw_peer(), ch.raw_peer()
    genuine.handshake()
    pages = random_pages(ch.receiver_fp, len(BLOCKS), seed=31)
    ch.receiver.expect(tid(1), "req", BLOCKS, LEASE_S)
    first = genuine.page(tid(1), pages[:1], BLOCKS)
    genuine.send_page(*first)
    genuine.sync()
    stranger.sock.send_multipart(list(first))  # on the ROUTER, as captured off the wire
    stranger.done(tid(1))
    stranger.sock.send(wire.encode(wire.AbortHeader(tid(1), "replayed"), GMAC))
    # told to handshake (a genuine sender that lost its handshake would, then abort)
    nacks = answers(stranger)
    assert nacks and {(a.transfer_id, a.message) for a in nacks} == {
        (tid(1), wire.HANDSHAKE_REQUIRED)
    }
    assert ch.receiver.pending() == 1 and not ch.rec.failed
    genuine_rest(ch, genuine, pages)
    assert same_bits(ch.dst.kv[:, :, BLOCKS], pages)
    assert not ch.rec.failed and ch.receiver.stats.failures == {}


def test_another_senders_frames_are_dropped_and_never_fail_it(
    make_channel: Callable[..., Channel],
) -> None:
    """Another handshaken sender's PAGE (other bytes), ABORT and DONE for a reservation the
    first has written to: dropped (its DONE answered FAILED at once), the first's completes."""
    ch = make_channel(receiver_auth=GMAC, sender=False)
    genuine, other = ch.raw_peer(), ch.raw_peer()
    genuine.handshake()
    other.handshake()
    pages = random_pages(ch.receiver_fp, len(BLOCKS), seed=32)
    ch.receiver.expect(tid(1), "req", BLOCKS, LEASE_S)
    genuine.send_page(*genuine.page(tid(1), pages[:1], BLOCKS))
    genuine.sync()
    wrong = random_pages(ch.receiver_fp, len(BLOCKS), seed=33)
    other.send_page(*other.page(tid(1), wrong[:1], BLOCKS))
    other.send(wire.AbortHeader(tid(1), "not mine to abort"))
    other.done(tid(1))
    ack = other.recv_ack()
    assert ack.transfer_id == tid(1) and ack.status is wire.AckStatus.FAILED
    assert "another sender" in ack.message
    other.sync()
    assert ch.receiver.pending() == 1 and not ch.rec.failed
    assert ch.receiver.stats.dropped_frames["other_sender"] == 3
    genuine_rest(ch, genuine, pages)
    assert same_bits(ch.dst.kv[:, :, BLOCKS], pages)
    assert not ch.rec.failed and ch.receiver.stats.failures == {}
