"""Contract, part 7: a decode worker restarted on the same KV endpoint (same tcp port, same ipc
path). The first transfer after the restart costs at most a re-handshake, never a lease: the
sender notices the lost connection and handshakes again before it sends; a receiver that gets a
reserved transfer's frames from a peer it does not know drops them (a stranger never ends a
transfer: it might be replaying captured frames) and tells it to handshake, and the sender,
once it has, aborts that transfer, which frees its blocks at once for a retry elsewhere."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import zmq

from benchmarks.fuzz_kv_attack_cases import Relay
from kvtransfer import wire
from kvtransfer.datapath import Backend
from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import TransferSpec
from tests.kvtransfer.harness import (
    GROUP_TIMEOUT_S,
    Channel,
    Transport,
    cache_for,
    random_pages,
    same_bits,
    tid,
    wait_until,
)

FAST_S = 3.0  # "at once": far under any lease (60 s in production), generous for two cores
LEASE_S = 60.0


def restart_receiver(ch: Channel) -> KVReceiver:
    """Stop the channel's receiver and start a new one (a fresh cache, the same callbacks) bound
    on the very endpoint the old one had."""
    ch.receiver.stop()
    ch.dst = cache_for(ch.receiver_fp, seed=98)
    receiver = KVReceiver(
        ch.endpoint,
        ch.dst,
        ch.receiver_fp,
        ch.receiver_auth,
        ch.rec.on_ready,
        ch.rec.on_failed,
        group_timeout_s=GROUP_TIMEOUT_S,
    )
    deadline = time.monotonic() + FAST_S
    while True:  # the old socket is closed by ZeroMQ's I/O thread, a moment after stop()
        try:
            assert receiver.start() == ch.endpoint
            break
        except zmq.ZMQError as exc:
            assert exc.errno == zmq.EADDRINUSE and time.monotonic() < deadline, exc
            time.sleep(0.02)
    ch.receiver = receiver
    return receiver


def test_the_sender_handshakes_again_with_a_restarted_receiver(
    make_channel: Callable[..., Channel], transport: Transport
) -> None:
    if transport.name == "inproc":
        pytest.skip("an inproc endpoint cannot outlive its process: nothing restarts on it")
    ch = make_channel()
    assert ch.sender is not None
    pages = random_pages(ch.receiver_fp, 2, seed=11)
    ch.receiver.expect(tid(1), "before", [2, 3], LEASE_S)
    ch.send("before", tid(1), [2, 3], pages)
    assert ch.rec.wait_sent("before") == (True, "")
    restarted = restart_receiver(ch)
    time.sleep(0.3)  # a real restart takes seconds: the sender sees the old connection go
    restarted.expect(tid(2), "after", [4, 5], LEASE_S)
    started = time.monotonic()
    ch.send("after", tid(2), [4, 5], pages)
    assert ch.rec.wait_sent("after") == (True, "")
    assert ch.rec.wait_ready("after") == 7
    assert time.monotonic() - started < FAST_S
    assert same_bits(ch.dst.kv[:, :, [4, 5]], pages)
    assert not ch.rec.failed
    assert restarted.pending() == 0 and ch.sender.pending() == 0
    # and the connection goes on serving
    restarted.expect(tid(3), "again", [6, 7], LEASE_S)
    ch.send("again", tid(3), [6, 7], pages)
    assert ch.rec.wait_sent("again") == (True, "")
    assert restarted.pending() == 0 and ch.sender.pending() == 0


@pytest.mark.parametrize("what", ["page", "done", "abort"])
def test_a_strangers_frames_are_nacked_and_its_abort_after_a_handshake_ends_it(
    channel: Channel, what: str
) -> None:
    """A peer that never handshook (to this process: it handshook with the one before the
    restart) sends a frame of a reserved transfer: nacked with "handshake required", and
    nothing else (no callback, the reservation still pending: a stranger might be replaying
    captured frames). Once it has handshaken (as a sender told so does), its ABORT fails the
    reservation at once."""
    ch = channel
    ch.receiver.expect(tid(1), "req", [1, 2], LEASE_S)
    stranger = ch.raw_peer()
    pages = random_pages(ch.receiver_fp, 2, seed=12)
    before = ch.dst.kv.clone()
    if what == "page":
        stranger.sock.send_multipart(list(stranger.page(tid(1), pages[:1], [1, 2])))
    elif what == "done":
        stranger.done(tid(1))
    else:
        stranger.sock.send(wire.encode(wire.AbortHeader(tid(1), "stranger"), stranger.auth))
    ack = stranger.recv_ack()
    assert ack.transfer_id == tid(1) and ack.status is wire.AckStatus.FAILED
    assert ack.message == wire.HANDSHAKE_REQUIRED
    stranger.sync()
    assert ch.receiver.pending() == 1 and not ch.rec.failed and not ch.rec.ready
    assert ch.receiver.stats.failures == {} and same_bits(ch.dst.kv, before)
    stranger.handshake()
    started = time.monotonic()
    stranger.send(wire.AbortHeader(tid(1), "nack: handshake required"))
    reason = ch.rec.wait_failed("req")
    assert time.monotonic() - started < FAST_S
    assert "handshake required" in reason and ch.rec.failed["req"] == [reason]
    assert ch.receiver.pending() == 0
    assert ch.receiver.stats.failures == {"aborted": 1}
    ack = stranger.recv_ack()  # the abort's
    assert ack.transfer_id == tid(1) and ack.status is wire.AckStatus.FAILED
    # the rest of the transfer's frames change nothing: no second callback
    stranger.send_pages(tid(1), pages, [1, 2])
    stranger.sync()
    assert ch.rec.failed["req"] == [reason] and not ch.rec.ready
    assert same_bits(ch.dst.kv, before)


def test_a_transfer_cut_by_the_restart_fails_at_once_and_the_next_goes_through(
    make_channel: Callable[..., Channel], transport: Transport
) -> None:
    """Pages already sent to the old process are lost with it: that transfer fails on the
    sender when the connection drops (not at its ack timeout), and the next one, to the new
    process, completes."""
    if transport.name == "inproc":
        pytest.skip("an inproc endpoint cannot outlive its process: nothing restarts on it")
    ch = make_channel()
    assert ch.sender is not None
    pages = random_pages(ch.receiver_fp, 2, seed=13)
    ch.receiver.expect(tid(1), "cut", [2, 3], LEASE_S)
    ch.send("cut", tid(1), [2, 3], pages, first_token_id=None, layers=range(1))
    wait_until(lambda: ch.receiver.stats.pages == 1, "the first layer")
    started = time.monotonic()
    restarted = restart_receiver(ch)
    ok, message = ch.rec.wait_sent("cut")
    assert not ok and message.startswith("connection_lost:")
    assert time.monotonic() - started < FAST_S
    assert ch.sender.pending() == 0
    ch.push(tid(1), pages, layers=range(1, 3))  # the owner's late calls send nothing
    ch.sender.finish(tid(1), 9)
    restarted.expect(tid(2), "next", [4, 5], LEASE_S)
    ch.send("next", tid(2), [4, 5], pages)
    assert ch.rec.wait_sent("next") == (True, "")
    assert ch.rec.wait_ready("next") == 7 and "cut" not in ch.rec.ready
    assert restarted.pending() == 0 and ch.sender.pending() == 0
    # the cut transfer's ABORT (sent once the sender handshook with the new process, before
    # "next") named a transfer this process never knew
    assert restarted.stats.dropped_frames == {"unknown_transfer": 1}


@pytest.mark.parametrize("transport", ["tcp", "ipc", "stream", "stream-ipc"], indirect=True)
def test_a_restart_the_sender_cannot_see_costs_one_transfer_at_most(
    make_channel: Callable[..., Channel], transport: Transport
) -> None:
    """The sender's connection outlives the restart (a relay in front of the receiver keeps it
    up, as when the socket monitor has not yet reported the drop), so nothing tells it the
    receiver is new. With the zmq backend its first frame after the restart reaches a receiver
    that does not know it: "handshake required", that transfer fails on the sender, which
    handshakes again and aborts it, so it fails at once on the receiver too (no resend), and the
    next goes through. With the stream backend the pair's stream was closed by the old receiver:
    the sender sees it before it sends, handshakes again, and the transfer goes through."""
    ch = make_channel()
    assert ch.sender is not None
    sender, relay = ch.sender, Relay(ch.endpoint)
    pages = random_pages(ch.receiver_fp, 2, seed=14)

    def send(rid: str, transfer: bytes, blocks: list[int]) -> tuple[bool, str]:
        sender.open(TransferSpec(rid, transfer, relay.endpoint, tuple(blocks)))
        ch.push(transfer, pages)
        sender.finish(transfer, 7)
        return ch.rec.wait_sent(rid)

    try:
        ch.receiver.expect(tid(1), "before", [2, 3], LEASE_S)
        assert send("before", tid(1), [2, 3]) == (True, "")
        restarted = restart_receiver(ch)
        time.sleep(0.3)  # the old receiver's stream is closed by now
        restarted.expect(tid(2), "after", [4, 5], LEASE_S)
        started = time.monotonic()
        outcome = send("after", tid(2), [4, 5])
        if transport.backend is Backend.ZMQ:
            assert outcome == (False, f"nack: {wire.HANDSHAKE_REQUIRED}")
            assert wire.HANDSHAKE_REQUIRED in ch.rec.wait_failed("after")
            assert restarted.stats.failures == {"aborted": 1}
        else:
            assert outcome == (True, "") and ch.rec.wait_ready("after") == 7
            assert same_bits(ch.dst.kv[:, :, [4, 5]], pages)
        assert time.monotonic() - started < FAST_S
        assert restarted.pending() == 0 and sender.pending() == 0
        restarted.expect(tid(3), "next", [6, 7], LEASE_S)
        assert send("next", tid(3), [6, 7]) == (True, "")
        assert ch.rec.wait_ready("next") == 7 and same_bits(ch.dst.kv[:, :, [6, 7]], pages)
        assert restarted.pending() == 0 and sender.pending() == 0
    finally:
        relay.close()
