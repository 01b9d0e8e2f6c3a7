"""Contract, part 3, on every CPU backend: how transfers end early. Leases expire when the
sender dies (its process killed mid-transfer), cancel and abort stop a transfer, and frames of a
transfer that has ended (completed, cancelled, expired) are dropped, counted, never written."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.block_pool import BlockPool
from kvtransfer import wire
from kvtransfer.datapath import RECORD, Backend, StreamLink
from kvtransfer.sender import KVSender, TransferSpec
from tests.kvtransfer.dying_sender import DyingSenders, tell
from tests.kvtransfer.harness import (
    CRC,
    LAYERS,
    NUM_BLOCKS,
    TIMEOUT_S,
    Channel,
    RawPeer,
    Transport,
    random_pages,
    same_bits,
    stop_all,
    tid,
    wait_until,
)

LEASE_S = 1.0  # from expect() to expiry; the dying sender's pages normally land well before


def test_receiver_cancel_stops_the_transfer(channel: Channel) -> None:
    ch = channel
    pages = random_pages(ch.receiver_fp, 2, seed=3)
    before = ch.dst.kv.clone()
    ch.receiver.expect(tid(1), "req", [6, 7], 60.0)
    ch.send("snd", tid(1), [6, 7], pages, first_token_id=None, layers=range(1))
    wait_until(lambda: ch.receiver.stats.pages == 1, "the first layer")
    assert ch.receiver.cancel(tid(1)) is True
    assert ch.receiver.cancel(tid(1)) is False and ch.receiver.pending() == 0
    before[:1, :, [6, 7]] = pages[:1]
    assert same_bits(ch.dst.kv, before)
    assert ch.sender is not None
    ch.push(tid(1), pages, layers=range(1, LAYERS))
    ch.sender.finish(tid(1), 9)
    ok, message = ch.rec.wait_sent("snd")
    assert not ok and message.startswith("nack:")
    assert same_bits(ch.dst.kv, before), "a page landed after cancel() returned"
    assert ch.receiver.stats.dropped_frames == {"unknown_transfer": LAYERS}
    assert not ch.rec.ready and not ch.rec.failed  # cancelling is the owner's act: no callback
    assert ch.sender.pending() == 0


def test_sender_abort_frees_the_receiver_at_once(channel: Channel) -> None:
    ch = channel
    pages = random_pages(ch.receiver_fp, 2, seed=4)
    before = ch.dst.kv.clone()
    ch.receiver.expect(tid(1), "req", [8, 9], 60.0)
    ch.send("snd", tid(1), [8, 9], pages, first_token_id=None, layers=range(1))
    wait_until(lambda: ch.receiver.stats.pages == 1, "the first layer")
    assert ch.sender is not None
    ch.sender.abort(tid(1), "request cancelled by the client")
    reason = ch.rec.wait_failed("req")
    assert "aborted" in reason and "request cancelled by the client" in reason
    assert ch.receiver.pending() == 0 and ch.receiver.stats.failures == {"aborted": 1}
    assert ch.rec.wait_sent("snd") == (False, "aborted: request cancelled by the client")
    assert ch.sender.pending() == 0
    # the owner's later calls for the aborted transfer send nothing
    ch.push(tid(1), pages, layers=range(1, LAYERS))
    ch.sender.finish(tid(1), 1)
    ch.sender.abort(tid(1), "again")
    before[:1, :, [8, 9]] = pages[:1]
    peer = ch.raw_peer()
    peer.handshake()
    peer.sync()  # the sender's frames, had there been any, were sent before this
    assert same_bits(ch.dst.kv, before) and ch.receiver.stats.pages == 1
    assert ch.rec.failed["req"] == [reason]
    assert ch.rec.sent["snd"] == [(False, "aborted: request cancelled by the client")]


def test_frames_of_ended_transfers_are_dropped(channel: Channel) -> None:
    """Late or duplicate frames for a transfer that completed, was cancelled, or expired: each
    dropped and counted, DONE answered with a nack, nothing written, no second callback."""
    ch = channel
    peer = ch.raw_peer()
    peer.handshake()
    genuine = random_pages(ch.receiver_fp, 2, seed=5)
    ch.receiver.expect(tid(1), "completed", [1, 2], 60.0)
    peer.send_pages(tid(1), genuine, [1, 2])
    peer.done(tid(1))
    assert peer.recv_ack().status is wire.AckStatus.OK
    ch.receiver.expect(tid(2), "cancelled", [3, 4], 60.0)
    assert ch.receiver.cancel(tid(2))
    ch.receiver.expect(tid(3), "expired", [5, 6], 0.01)
    ch.rec.wait_failed("expired")
    before = ch.dst.kv.clone()
    late = random_pages(ch.receiver_fp, 2, seed=6)
    for n, blocks in [(1, [1, 2]), (2, [3, 4]), (3, [5, 6])]:
        peer.send_pages(tid(n), late, blocks)
        peer.send_pages(tid(n), late, blocks)  # and a duplicate
        peer.done(tid(n))
        ack = peer.recv_ack()
        assert ack.status is wire.AckStatus.FAILED and "unknown" in ack.message
    assert ch.receiver.stats.dropped_frames == {"unknown_transfer": 3 * (2 * LAYERS + 1)}
    assert same_bits(ch.dst.kv, before)
    # a whole duplicate transfer through the real sender is refused the same way
    ch.send("duplicate", tid(1), [1, 2], late)
    assert ch.rec.wait_sent("duplicate")[0] is False
    assert same_bits(ch.dst.kv, before)
    assert dict(ch.rec.ready) == {"completed": [7]}
    assert list(ch.rec.failed) == ["expired"] and len(ch.rec.failed["expired"]) == 1
    assert ch.receiver.stats.transfers_completed == 1 and ch.receiver.pending() == 0


def test_lease_expires_when_the_sender_process_dies(
    make_channel: Callable[..., Channel], transport: Transport, dying_senders: DyingSenders
) -> None:
    """The sender pushes two of three layers and is SIGKILLed. The lease frees the
    reservation (on_failed, pending 0, blocks back to the pool); later frames are dropped.
    inproc cannot cross processes: there the sender is stopped in-process instead (its thread
    and sockets go away without DONE or ABORT)."""
    channel = make_channel(sender=False)
    pool = BlockPool(NUM_BLOCKS)
    blocks = pool.allocate(3)
    pages = random_pages(channel.receiver_fp, len(blocks), seed=1)
    before = channel.dst.kv.clone()
    sent = 2
    if transport.name == "inproc":
        channel.start_sender()
        channel.receiver.expect(tid(1), "req", blocks, LEASE_S)
        channel.send("dying", tid(1), blocks, pages, first_token_id=None, layers=range(sent))
        wait_until(
            lambda: channel.receiver.stats.pages == sent or "req" in channel.rec.failed,
            "the pages or the expiry",
        )
        assert channel.sender is not None
        channel.sender.stop()
    else:
        proc = dying_senders.take()
        channel.receiver.expect(tid(1), "req", blocks, LEASE_S)
        dying_senders.push(proc, channel, blocks, sent)
        wait_until(
            lambda: channel.receiver.stats.pages == sent or "req" in channel.rec.failed,
            "the pages or the expiry",
        )
        tell(proc, "die")
        assert proc.wait(TIMEOUT_S) == -signal.SIGKILL
    reason = channel.rec.wait_failed("req")
    assert "lease expired" in reason and channel.rec.failed["req"] == [reason]
    assert channel.receiver.pending() == 0 and not channel.rec.ready
    assert channel.receiver.stats.failures == {"lease_expired": 1}
    pool.free(blocks)
    pool.check_integrity()
    assert pool.num_free == NUM_BLOCKS
    # what arrived before the death is the sender's data, the rest is untouched
    arrived = channel.receiver.stats.pages
    before[:arrived, :, blocks] = pages[:arrived]
    assert same_bits(channel.dst.kv, before)
    # late frames (a restarted sender replaying the transfer) are dropped
    dropped = channel.receiver.stats.dropped_frames["unknown_transfer"]
    peer = channel.raw_peer()
    peer.handshake()
    peer.send_pages(tid(1), random_pages(channel.receiver_fp, len(blocks), seed=2), blocks)
    peer.done(tid(1))
    assert peer.recv_ack().status is wire.AckStatus.FAILED
    # (>=: had the lease run out first, the dead sender's own pages may be dropped meanwhile)
    assert channel.receiver.stats.dropped_frames["unknown_transfer"] >= dropped + LAYERS + 1
    assert set(channel.receiver.stats.dropped_frames) == {"unknown_transfer"}
    assert same_bits(channel.dst.kv, before)


# -- bugs -------------------------------------------------------------------------------------


def test_a_refused_page_fails_only_its_transfer(
    make_channel: Callable[..., Channel], request: pytest.FixtureRequest
) -> None:
    """A page whose block count disagrees with its transfer (an owner's bug) is refused in the
    caller and aborts its transfer on both sides; the next transfer on the same sender is
    unaffected."""
    ch = make_channel(handshake_timeout_s=2.0)  # gloo: also the sender's payload send timeout
    assert ch.sender is not None
    before = ch.dst.kv.clone()
    ch.receiver.expect(tid(1), "bad", [1, 2], 60.0)
    ch.sender.open(TransferSpec("s-bad", tid(1), ch.endpoint, (1, 2)))
    with pytest.raises(ValueError, match="3 blocks of pages for 2 reserved"):
        ch.sender.send_pages(tid(1), 0, random_pages(ch.receiver_fp, 3, seed=7))
    ch.sender.finish(tid(1), 1)  # after the abort: ignored
    good = random_pages(ch.receiver_fp, 2, seed=8)
    ch.receiver.expect(tid(2), "good", [3, 4], 60.0)
    ch.send("s-good", tid(2), [3, 4], good)
    ch.rec.wait(lambda: len(ch.rec.sent) == 2 and "good" in ch.rec.ready, "both transfers")
    assert ch.rec.sent["s-good"] == [(True, "")] and ch.rec.sent["s-bad"][0][0] is False
    # "bad" ended before "good" on the receiving thread, so its callback has run by now
    assert "bad" in ch.rec.failed, "the decode side still holds the bad transfer's blocks"
    assert ch.receiver.pending() == 0
    before[:, :, [3, 4]] = good
    assert same_bits(ch.dst.kv, before)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_bad_input_fails_only_its_transfer(tmp_path: Path) -> None:
    """An endpoint ZeroMQ cannot parse, pages the wire cannot carry, an empty page: each is
    refused in the caller or fails its own transfer, and the sender goes on working."""
    ch = Channel(Transport("inproc", Backend.ZMQ, tmp_path), sender=False)
    good = random_pages(ch.receiver_fp, 1, seed=9)
    bad_inputs: dict[str, tuple[str, torch.Tensor]] = {
        "endpoint": ("tcp://127.0.0.1:not-a-port", good),
        "fp8": (ch.endpoint, good.to(torch.float8_e4m3fn)),
        "empty": (ch.endpoint, good[:0]),
    }
    senders = []
    try:
        for n, (name, (endpoint, pages)) in enumerate(bad_inputs.items()):
            sender = KVSender(ch.receiver_fp, CRC, on_sent=ch.rec.on_sent)
            sender.start()
            senders.append(sender)
            try:
                sender.open(TransferSpec(name, tid(n), endpoint, (1,)))
                sender.send_pages(tid(n), 0, pages)
                sender.finish(tid(n), 1)
            except Exception:  # refusing in the caller's thread is fine too
                ch.rec.on_sent(name, False, "refused by send_pages")
            ch.receiver.expect(tid(10 + n), f"good-{name}", [n], 60.0)
            sender.open(TransferSpec(f"good-{name}", tid(10 + n), ch.endpoint, (n,)))
            sender.send_pages(tid(10 + n), 0, good)
            sender.finish(tid(10 + n), 1)
        ch.rec.wait(lambda: len(ch.rec.sent) == 6, "every transfer to end", timeout=3.0)
    finally:
        stop_all(senders)
        ch.close()
    for name in bad_inputs:
        assert ch.rec.sent[name][0][0] is False and ch.rec.sent[f"good-{name}"] == [(True, "")]
    assert all(sender.pending() == 0 for sender in senders)


def test_lease_expiry_is_not_held_up_by_a_stalled_rendezvous(
    make_channel: Callable[..., Channel], request: pytest.FixtureRequest, transport: Transport
) -> None:
    """A peer that says HELLO and then never joins its pair group (it died, or its handshake
    timed out first) must not stop the receiver from expiring leases or serving others."""
    if not transport.backend.out_of_band:
        pytest.skip("only out-of-band backends rendezvous")
    ch = make_channel(sender=False, group_timeout_s=2.0)
    ghost = ch.raw_peer()
    ghost.sock.send(ghost.hello_frame())
    assert ghost.recv().kind is wire.FrameKind.WELCOME  # type: ignore[union-attr]
    ch.receiver.expect(tid(1), "req", [1], 0.05)
    ch.rec.wait(lambda: "req" in ch.rec.failed, "the lease to expire", timeout=1.0)


def _half_sent_page(ch: Channel, seed: int) -> tuple[RawPeer, torch.Tensor, bytes, int]:
    """Stream backend: a handshaken raw peer, transfer 1 expected into blocks 6 and 7, its
    pages, and the record of its first layer, of which the first ``cut`` bytes (up to half the
    payload) have been sent."""
    if ch.receiver.backend is not Backend.STREAM or not ch.receiver.writes_in_place:
        pytest.skip("only the stream backend reads records off a socket, in place")
    peer = ch.raw_peer()
    peer.handshake()
    assert isinstance(peer.link, StreamLink)
    pages = random_pages(ch.receiver_fp, 2, seed=seed)
    ch.receiver.expect(tid(1), "req1", [6, 7], 60.0)
    header, payload = peer.page(tid(1), pages[:1], [6, 7])
    record = RECORD.pack(len(header), 0, len(payload)) + header + payload
    cut = len(record) - len(payload) // 2
    peer.link.sock.sendall(record[:cut])
    return peer, pages, record, cut


def test_cancel_during_an_in_place_read_waits_for_it_then_nothing_lands(
    channel: Channel,
) -> None:
    """Stream backend: a page is read straight into its blocks outside the receiver's lock.
    A cancel that arrives mid-page returns within one read slice, and the rest of the payload
    (sent after the cancel returned) is discarded, never written into the freed blocks."""
    ch = channel
    peer, pages, record, cut = _half_sent_page(ch, seed=8)
    assert isinstance(peer.link, StreamLink)
    wait_until(lambda: ch.dst.kv[0, 0, 6].flatten()[0] == pages[0, 0, 0].flatten()[0], "a read")
    assert ch.receiver.cancel(tid(1)) is True
    landed = ch.dst.kv.clone()
    peer.link.sock.sendall(record[cut:])
    peer.sync()
    assert same_bits(ch.dst.kv, landed), "bytes landed after cancel() returned"
    assert ch.receiver.stats.pages == 0 and ch.receiver.pending() == 0
    assert ch.receiver.stats.dropped_frames["unknown_transfer"] == 2  # the page and the sync
    assert not ch.rec.ready and not ch.rec.failed
    # the pair stream stayed in step: a new transfer on the same link goes through
    ch.receiver.expect(tid(2), "req2", [6, 7], 60.0)
    peer.send_pages(tid(2), pages, [6, 7])
    peer.done(tid(2), first_token_id=4)
    assert peer.recv_ack().status is wire.AckStatus.OK
    assert same_bits(ch.dst.kv[:, :, [6, 7]], pages)


def test_a_peer_stalled_inside_a_record_is_dropped_and_others_go_on(
    make_channel: Callable[..., Channel],
) -> None:
    """Stream backend: a peer that stops in the middle of a record (hung, not dead: its
    socket stays open) holds the receiving thread for the stall limit at most; then it is
    forgotten and a healthy sender's transfer completes."""
    ch = make_channel(group_timeout_s=1.0)
    _, pages, _, _ = _half_sent_page(ch, seed=9)  # and then nothing more
    ch.receiver.expect(tid(2), "req", [8, 9], 60.0)
    ch.send("snd", tid(2), [8, 9], pages)
    assert ch.rec.wait_ready("req") == 7
    assert same_bits(ch.dst.kv[:, :, [8, 9]], pages)
    # tid 1's half page never counted
    assert ch.receiver.pending() == 1 and ch.receiver.stats.pages == LAYERS
    assert ch.receiver.cancel(tid(1)) is True
