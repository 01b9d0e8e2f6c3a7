"""Contract, part 2, on every CPU backend: corrupted, truncated, forged and nonsensical frames
are refused and counted, and never reach the cache.

A :class:`RawPeer` (after a valid HELLO) plays the misbehaving sender. Each test ends with a
genuine completion of the same transfer, so "refused" also means "did not break the channel"."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch

from kvtransfer import wire
from kvtransfer.datapath import Backend
from tests.kvtransfer.harness import (
    KEY,
    LAYERS,
    OTHER_KEY,
    Channel,
    RawPeer,
    Transport,
    drops,
    mismatched,
    random_pages,
    same_bits,
    tid,
    wait_until,
)

BLOCKS = [5, 11]
HMAC = wire.FrameAuth(KEY)
ZMQ_TRANSPORTS = ("tcp", "ipc", "inproc")


def armed(ch: Channel) -> tuple[RawPeer, torch.Tensor, torch.Tensor]:
    """A handshaken raw peer, transfer 1 expected into BLOCKS, its genuine pages, and a copy
    of the cache to compare with."""
    peer = ch.raw_peer()
    peer.handshake()
    ch.receiver.expect(tid(1), "req", BLOCKS, 60.0)
    return peer, random_pages(ch.receiver_fp, len(BLOCKS), seed=1), ch.dst.kv.clone()


def assert_untouched(ch: Channel, peer: RawPeer, before: torch.Tensor, **counts: int) -> None:
    """Once the receiver has handled everything ``peer`` sent: the cache is unchanged (with a
    receiver that reads payloads in place, outside the reservation: a refused page may have
    scribbled on reserved blocks, which count only once a verified page marks them, see
    ``complete``), the transfer still pending with no callback, and exactly these drops were
    counted."""
    peer.sync()
    dropped = dict(ch.receiver.stats.dropped_frames)
    dropped["unknown_transfer"] -= 1  # the sync frame
    assert {k: v for k, v in dropped.items() if v} == counts
    if ch.receiver.writes_in_place:
        outside = [b for b in range(ch.dst.num_blocks) if b not in BLOCKS]
        assert same_bits(ch.dst.kv[:, :, outside], before[:, :, outside])
    else:
        assert same_bits(ch.dst.kv, before)
    assert ch.receiver.pending() == 1 and not ch.rec.ready and not ch.rec.failed
    assert ch.receiver.stats.pages == 0


def complete(ch: Channel, peer: RawPeer, pages: torch.Tensor) -> None:
    """The genuine transfer still goes through, bit-exact."""
    peer.send_pages(tid(1), pages, BLOCKS)
    peer.done(tid(1), first_token_id=3)
    assert peer.recv_ack().status is wire.AckStatus.OK
    ch.rec.wait(lambda: "req" in ch.rec.ready, "on_ready")
    assert ch.rec.ready["req"] == [3] and same_bits(ch.dst.kv[:, :, BLOCKS], pages)
    assert ch.receiver.pending() == 0


def test_flipped_payload_byte_is_refused(channel: Channel) -> None:
    peer, pages, before = armed(channel)
    for index in (0, 1000, -1):
        header, payload = peer.page(tid(1), pages[:1], BLOCKS)
        corrupted = bytearray(payload)
        corrupted[index] ^= 0x20
        peer.send_page(header, bytes(corrupted))
    assert_untouched(channel, peer, before, malformed=3)
    complete(channel, peer, pages)


def test_a_corrupted_copy_of_a_verified_page_changes_nothing(channel: Channel) -> None:
    """Receivers that check a page's tag as it lands (copied or read into its blocks) must not
    let a copy of a page that already verified land before its own check: it would undo (or
    overwrite) good bytes. The bad copy is refused untouched and the transfer completes."""
    peer, pages, _ = armed(channel)
    peer.send_pages(tid(1), pages, BLOCKS)  # every layer, genuine
    for index in (5, -1):
        header, payload = peer.page(tid(1), pages[:1], BLOCKS)
        corrupted = bytearray(payload)
        corrupted[index] ^= 0x01
        peer.send_page(header, bytes(corrupted))
    peer.done(tid(1), first_token_id=3)
    ack = peer.recv_ack()
    assert ack.status is wire.AckStatus.OK, ack.message
    assert channel.receiver.stats.dropped_frames["malformed"] == 2
    channel.rec.wait(lambda: "req" in channel.rec.ready, "on_ready")
    assert same_bits(channel.dst.kv[:, :, BLOCKS], pages)
    assert channel.receiver.pending() == 0


def test_a_replayed_hello_is_refused_and_forged_pages_spoil_nothing(
    make_channel: Callable[..., Channel],
) -> None:
    """On a keyed channel a captured HELLO sent again from another connection is refused
    (each HELLO is accepted once); and a page for a keyed transfer sealed with a wrong key,
    sent after the genuine pages landed over a handshaken connection, is dropped as
    unauthenticated: the transfer completes bit-exact."""
    ch = make_channel(receiver_auth=HMAC)
    if ch.receiver.backend.out_of_band:
        pytest.skip("handshakes and in-band pages on the ROUTER: the zmq backend's")
    peer = ch.raw_peer()
    hello = peer.hello_frame()
    peer.sock.send(hello)
    assert peer.recv().kind is wire.FrameKind.WELCOME  # type: ignore[union-attr]
    replayer = ch.raw_peer()
    replayer.sock.send(hello)
    refused = replayer.recv()
    assert isinstance(refused, wire.HandshakeHeader) and refused.kind is wire.FrameKind.REFUSE
    assert "replayed" in refused.fields["reason"]
    assert ch.receiver.stats.dropped_frames["stale_handshake"] == 1
    ch.receiver.expect(tid(1), "req", BLOCKS, 60.0)
    pages = random_pages(ch.receiver_fp, len(BLOCKS), seed=1)
    peer.send_pages(tid(1), pages, BLOCKS)
    wrong = wire.FrameAuth(OTHER_KEY)
    peer.send_page(*peer.page(tid(1), torch.zeros_like(pages[:1]), BLOCKS, auth=wrong))
    peer.done(tid(1), first_token_id=3)
    ack = peer.recv_ack()
    assert ack.status is wire.AckStatus.OK, ack.message
    assert ch.receiver.stats.dropped_frames["unauthenticated"] == 1
    assert same_bits(ch.dst.kv[:, :, BLOCKS], pages)


def _flipped(header: bytes, index: int) -> bytes:
    corrupted = bytearray(header)
    corrupted[index] ^= 0xFF
    return bytes(corrupted)


def _resets_peer(ch: Channel, frame: bytes) -> bool:
    """An out-of-band header whose payload size cannot be trusted: the receiver cannot stay in
    step with the pair group, so it forgets the peer instead of dropping just the frame."""
    return (
        ch.receiver.backend in (Backend.GLOO, Backend.NCCL)
        and wire.is_out_of_band_page(frame)
        and wire.out_of_band_payload_size(frame) is None
    )


def test_every_flipped_header_byte_is_refused(channel: Channel) -> None:
    """Each byte of a PAGE header (magic to tag; the flags byte has its own test) inverted."""
    peer, pages, before = armed(channel)
    header, payload = peer.page(tid(1), pages[1:2], BLOCKS, layer_start=1)
    positions = [
        i for i in range(len(header)) if i != 7 and not _resets_peer(channel, _flipped(header, i))
    ]
    for index in positions:
        corrupted = bytearray(header)
        corrupted[index] ^= 0xFF
        peer.send_page(bytes(corrupted), payload)
    assert_untouched(channel, peer, before, malformed=len(positions))
    complete(channel, peer, pages)


def test_unreadable_out_of_band_header_resets_the_peer(channel: Channel) -> None:
    """On an out-of-band backend a header whose payload size is garbled cannot be skipped
    safely: the peer is forgotten (nothing written) and must handshake again to continue."""
    if channel.receiver.backend not in (Backend.GLOO, Backend.NCCL):
        pytest.skip("payloads travel with their header or in sized records: nothing to lose")
    peer, pages, before = armed(channel)
    header, payload = peer.page(tid(1), pages[:1], BLOCKS)
    index = next(i for i in range(len(header)) if _resets_peer(channel, _flipped(header, i)))
    peer.send_page(_flipped(header, index), payload)
    peer.done(tid(2))  # from a forgotten peer: refused, "handshake required"
    ack = peer.recv_ack()
    assert ack.status is wire.AckStatus.FAILED and "handshake" in ack.message
    assert same_bits(channel.dst.kv, before) and channel.receiver.pending() == 1
    assert channel.receiver.stats.dropped_frames["malformed"] == 1
    peer.handshake()
    complete(channel, peer, pages)


def test_flipped_flag_bits_are_refused(channel: Channel) -> None:
    """A flipped "MACed" bit makes the frame unauthenticated; unknown bits break its tag."""
    peer, pages, before = armed(channel)
    header, payload = peer.page(tid(1), pages[:1], BLOCKS)
    for bit in (1, 3, 4, 5, 6, 7):
        corrupted = bytearray(header)
        corrupted[7] ^= 1 << bit
        peer.send_page(bytes(corrupted), payload)
    assert_untouched(channel, peer, before, malformed=5, unauthenticated=1)
    complete(channel, peer, pages)


def test_flipped_out_of_band_bit_is_refused_as_malformed(
    channel: Channel, request: pytest.FixtureRequest
) -> None:
    peer, pages, before = armed(channel)
    header, payload = peer.page(tid(1), pages[:1], BLOCKS)
    corrupted = bytearray(header)
    corrupted[7] ^= wire.FLAG_OUT_OF_BAND
    peer.send_page(bytes(corrupted), payload)
    assert_untouched(channel, peer, before, malformed=1)
    complete(channel, peer, pages)


@pytest.mark.parametrize("cut", [0, 10, 39, -1, -16])
def test_header_cut_short_is_refused(channel: Channel, cut: int) -> None:
    peer, pages, before = armed(channel)
    header, payload = peer.page(tid(1), pages[:1], BLOCKS)
    if _resets_peer(channel, header[:cut]):
        pytest.skip("an out-of-band header cut short resets the peer (tested below)")
    peer.send_page(header[:cut], payload)
    assert_untouched(channel, peer, before, malformed=1)
    complete(channel, peer, pages)


def test_payload_cut_in_transit_is_refused(channel: Channel, transport: Transport) -> None:
    """Shorter than declared and than what the tag covers: the checksum catches it."""
    if transport.backend in (Backend.GLOO, Backend.NCCL):
        pytest.skip("pair-group payloads are read by the size their header declares")
    peer, pages, before = armed(channel)
    header, payload = peer.page(tid(1), pages[:1], BLOCKS)
    for cut in (1, 4, len(payload) - 1):
        peer.send_page(header, payload[:-cut])
    peer.send_page(header, b"")  # no payload at all
    refused = 4
    if transport.backend is not Backend.STREAM:  # a stream's frames do not come on ZeroMQ
        peer.sock.send_multipart([header, payload, b"extra"])  # (and would race the sync)
        refused += 1
    assert_untouched(channel, peer, before, malformed=refused)
    complete(channel, peer, pages)


def test_payload_shorter_than_declared_fails_the_transfer(
    channel: Channel, transport: Transport
) -> None:
    """A sender that seals a short payload (its tag verifies) is refused by the size check:
    the transfer fails at once, nothing is written."""
    if transport.backend in (Backend.GLOO, Backend.NCCL):
        pytest.skip("pair-group payloads are read by the size their header declares")
    peer, pages, before = armed(channel)
    header, payload = peer.page(tid(1), pages[:1], BLOCKS)
    decoded = wire.decode(header, peer.auth, memoryview(payload))
    short = payload[:-8]
    peer.send_page(wire.encode(decoded, peer.auth, memoryview(short)), short)
    ack = peer.recv_ack()
    assert ack.status is wire.AckStatus.FAILED and "payload of" in ack.message
    assert "payload of" in channel.rec.wait_failed("req")
    assert same_bits(channel.dst.kv, before) and channel.receiver.pending() == 0


def nonsense(ch: Channel, pages: torch.Tensor) -> dict[str, tuple[Callable[[RawPeer], None], str]]:
    """Well-formed, authentic frames that no correct sender sends for this transfer, and the
    reason each must fail it with."""
    f16 = random_pages(mismatched(ch.receiver_fp, "dtype", "float16"), len(BLOCKS), seed=3)
    wide = random_pages(mismatched(ch.receiver_fp, "head_dim", 16), len(BLOCKS), seed=4)
    ack = wire.AckHeader(tid(1), wire.AckStatus.OK, "")
    return {
        "foreign-blocks": (lambda p: p.send_page(*p.page(tid(1), pages[:1], [5, 6])), "blocks"),
        "bad-layer": (lambda p: p.send_page(*p.page(tid(1), pages[:1], BLOCKS, LAYERS)), "layer"),
        "dtype": (lambda p: p.send_page(*p.page(tid(1), f16[:1], BLOCKS)), "geometry"),
        "head-dim": (lambda p: p.send_page(*p.page(tid(1), wide[:1], BLOCKS)), "geometry"),
        "done-early": (lambda p: p.done(tid(1)), "incomplete"),
        "done-layers": (lambda p: p.done(tid(1), num_layers=LAYERS + 1), "DONE for"),
        "abort": (lambda p: p.send(wire.AbortHeader(tid(1), "prefill died")), "prefill died"),
        "stray-ack": (lambda p: p.send(ack), "ACK"),
    }


def test_nonsensical_frames_fail_the_transfer_without_writing(channel: Channel) -> None:
    peer, pages, before = armed(channel)
    channel.receiver.cancel(tid(1))
    cases = nonsense(channel, pages)
    for n, (name, (send, reason)) in enumerate(cases.items()):
        channel.receiver.expect(tid(1), name, BLOCKS, 60.0)
        if name == "done-early":  # every layer but the last arrived
            peer.send_pages(tid(1), pages[:-1], BLOCKS)
        send(peer)
        ack = peer.recv_ack()
        assert ack.status is wire.AckStatus.FAILED and reason in ack.message, (name, ack)
        assert reason in channel.rec.wait_failed(name), name
        assert channel.receiver.pending() == 0, name
        if name == "done-early":
            before[:-1, :, BLOCKS] = pages[:-1]
        assert same_bits(channel.dst.kv, before), name
        assert len(channel.rec.failed) == n + 1 and not channel.rec.ready


def test_failure_reasons_are_a_closed_set(
    channel: Channel, transport: Transport, request: pytest.FixtureRequest
) -> None:
    """``stats.failures`` is exported by reason: the keys must be short labels, not messages
    with numbers in them (an unbounded label set)."""
    peer, pages, _ = armed(channel)
    peer.done(tid(1), num_layers=LAYERS + 1)
    peer.recv_ack()
    if not transport.backend.out_of_band:
        channel.receiver.expect(tid(2), "short", BLOCKS, 60.0)
        header, payload = peer.page(tid(2), pages[:1], BLOCKS)
        decoded = wire.decode(header, peer.auth, memoryview(payload))
        peer.send_page(wire.encode(decoded, peer.auth, memoryview(payload[:-4])), payload[:-4])
        peer.recv_ack()
    assert channel.receiver.stats.failures
    for label in channel.receiver.stats.failures:
        assert re.fullmatch(r"[a-z_]+", label), label


def test_checksum_cannot_be_switched_off_by_the_frame(
    channel: Channel, request: pytest.FixtureRequest
) -> None:
    peer, pages, before = armed(channel)
    header, payload = peer.page(tid(1), pages[:1], BLOCKS)
    downgraded, corrupted = bytearray(header), bytearray(payload)
    downgraded[7] &= ~wire.FLAG_CHECKSUM
    corrupted[100] ^= 0x01
    peer.send_page(bytes(downgraded), bytes(corrupted))
    assert_untouched(channel, peer, before, malformed=1)  # (syncs first)


# -- keyed channel: forged frames -------------------------------------------------------------


def test_forged_frames_are_dropped_as_unauthenticated(
    make_channel: Callable[..., Channel],
) -> None:
    """A handshaken peer's frames that carry a MAC with the wrong key, a CRC only, or no tag
    at all are dropped and counted; forged DONE and ABORT neither end nor fail the transfer."""
    ch = make_channel(receiver_auth=HMAC)
    peer, pages, before = armed(ch)
    forgeries = [wire.FrameAuth(OTHER_KEY), wire.FrameAuth(None), wire.FrameAuth(None, False)]
    fake = random_pages(ch.receiver_fp, len(BLOCKS), seed=9)
    for auth in forgeries:
        peer.send_page(*peer.page(tid(1), fake[:1], BLOCKS, auth=auth))
        peer.send(wire.DoneHeader(tid(1), 1, LAYERS), auth)
        peer.send(wire.AbortHeader(tid(1), "forged"), auth)
    # forged pages whose bodies are nonsense too (outside the reservation, a layer the pool
    # lacks, a wrong block count) are still counted for what they are: unauthenticated
    bogus = [
        peer.page(tid(1), fake[:1], [40, 41], auth=forgeries[0]),
        peer.page(tid(1), fake[:1], BLOCKS, layer_start=LAYERS, auth=forgeries[0]),
        peer.page(tid(1), fake[:1, :, :1], BLOCKS[:1], auth=forgeries[0]),
    ]
    if ch.receiver.backend is Backend.ZMQ:  # a body that does not even decode, in band
        wrong_size = wire.PageHeader(
            tid(1), 0, 1, tuple(BLOCKS), *fake.shape[3:], fake.dtype, payload_nbytes=96
        )
        bogus.append((wire.encode(wrong_size, forgeries[0], memoryview(bytes(96))), bytes(96)))
    for header, payload in bogus:
        peer.send_page(header, payload)
    assert_untouched(ch, peer, before, unauthenticated=3 * len(forgeries) + len(bogus))
    complete(ch, peer, pages)


def test_forged_page_from_a_stranger_is_unauthenticated(
    make_channel: Callable[..., Channel], request: pytest.FixtureRequest
) -> None:
    ch = make_channel(receiver_auth=HMAC, sender=False)
    ch.receiver.expect(tid(1), "req", BLOCKS, 60.0)
    before = ch.dst.kv.clone()
    stranger = ch.raw_peer(auth=wire.FrameAuth(OTHER_KEY))
    forged = random_pages(ch.receiver_fp, len(BLOCKS), seed=8)[:1]
    stranger.send_page(*stranger.page(tid(1), forged, BLOCKS))
    stranger.send(wire.HandshakeHeader(bytes(16), wire.FrameKind.HELLO, {}))
    insider = ch.raw_peer()
    insider.sync()  # a keyed frame without a handshake: nacked, counted as no_handshake
    wait_until(lambda: drops(ch.receiver) >= 3, "the drops")
    assert ch.receiver.stats.dropped_frames == {"unauthenticated": 2, "no_handshake": 1}
    assert same_bits(ch.dst.kv, before) and ch.receiver.pending() == 1
