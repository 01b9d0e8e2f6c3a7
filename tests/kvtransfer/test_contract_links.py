"""Contract, part 8: a KV connection that breaks (reset by a middlebox) or stalls (an ack that
never comes) while both ends live costs the transfers on it a retry, never a lease. The sender
fails what it had sent on that connection, handshakes again at once (on a fresh socket after an
ack timeout) and aborts them there, so the decode worker frees their reservations within
moments; the next transfer goes through on the new connection. The control connection crosses
``tests/support/fault_proxy.py``'s proxy (the stream backend's pages go on their own stream, not
through it: resetting the control connection closes the pair's stream too)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from kvtransfer.sender import TransferSpec
from tests.kvtransfer.harness import (
    LAYERS,
    Channel,
    random_pages,
    same_bits,
    tid,
    wait_until,
)
from tests.support.fault_proxy import FaultProxy

FAST_S = 3.0  # "at once": far under any lease (60 s in production), generous for two cores
LEASE_S = 60.0
ACK_TIMEOUT_S = 1.5

pytestmark = pytest.mark.parametrize("transport", ["tcp", "stream"], indirect=True)


@pytest.fixture
def proxied(make_channel: Callable[..., Channel]) -> Iterator[tuple[Channel, FaultProxy, str]]:
    """A channel whose sender reaches the receiver's control endpoint through a proxy: the
    channel, the proxy, and the endpoint to name in transfers."""
    ch = make_channel(ack_timeout_s=ACK_TIMEOUT_S)
    with FaultProxy(ch.endpoint.removeprefix("tcp://")) as proxy:
        yield ch, proxy, f"tcp://{proxy.address}"


def send(ch: Channel, via: str, rid: str, transfer: bytes, blocks: list[int], seed: int) -> None:
    assert ch.sender is not None
    pages = random_pages(ch.receiver_fp, len(blocks), seed=seed)
    ch.receiver.expect(transfer, rid, blocks, LEASE_S)
    ch.sender.open(TransferSpec(rid, transfer, via, tuple(blocks)))
    ch.push(transfer, pages)
    ch.sender.finish(transfer, 7)
    assert ch.rec.wait_sent(rid) == (True, "")
    assert ch.rec.wait_ready(rid) == 7
    assert same_bits(ch.dst.kv[:, :, blocks], pages)


def test_a_connection_reset_mid_transfer_fails_both_ends_at_once(
    proxied: tuple[Channel, FaultProxy, str],
) -> None:
    ch, proxy, via = proxied
    assert ch.sender is not None
    send(ch, via, "warm", tid(1), [0, 1], seed=20)  # the connection is up and handshaken
    pages = random_pages(ch.receiver_fp, 2, seed=21)
    ch.receiver.expect(tid(2), "cut", [2, 3], LEASE_S)
    ch.sender.open(TransferSpec("cut", tid(2), via, (2, 3)))
    ch.push(tid(2), pages, layers=range(1))
    wait_until(lambda: ch.receiver.stats.pages == LAYERS + 1, "the first layer")  # after warm's
    started = time.monotonic()
    assert proxy.reset_all() == 1
    ok, message = ch.rec.wait_sent("cut")
    assert not ok and message.startswith("connection_lost:"), message
    reason = ch.rec.wait_failed("cut")  # the sender's ABORT, after its new handshake
    assert "aborted" in reason and "connection_lost" in reason, reason
    assert time.monotonic() - started < FAST_S
    assert ch.receiver.pending() == 0 and ch.sender.pending() == 0
    ch.push(tid(2), pages, layers=range(1, 3))  # the owner's late calls send nothing
    ch.sender.finish(tid(2), 9)
    send(ch, via, "next", tid(3), [4, 5], seed=22)
    assert ch.rec.failed["cut"] == [reason] and "cut" not in ch.rec.ready
    assert proxy.stats().connections == 2
    assert ch.receiver.stats.failures == {"aborted": 1}


def test_an_ack_timeout_reconnects_and_aborts_what_it_stranded(
    proxied: tuple[Channel, FaultProxy, str],
) -> None:
    """The control path blackholed mid-transfer until the ack times out: the sender gives up
    that connection for a fresh one (not one stuck in TCP's retransmission backoff) and, once
    the path heals, aborts what it stranded; whatever the receiver made of the frames the old
    connection still delivers, the reservation ends once, and the next transfer goes through."""
    ch, proxy, via = proxied
    assert ch.sender is not None
    send(ch, via, "warm", tid(1), [0, 1], seed=23)
    pages = random_pages(ch.receiver_fp, 2, seed=24)
    ch.receiver.expect(tid(2), "stalled", [2, 3], LEASE_S)
    proxy.blackhole()
    ch.sender.open(TransferSpec("stalled", tid(2), via, (2, 3)))
    ch.push(tid(2), pages)
    ch.sender.finish(tid(2), 7)
    ok, message = ch.rec.wait_sent("stalled")
    assert not ok and message.startswith("ack_timeout:"), message
    wait_until(lambda: proxy.stats().connections == 2, "a fresh connection")
    healed = time.monotonic()
    proxy.heal()
    ch.rec.wait(lambda: "stalled" in ch.rec.ready or "stalled" in ch.rec.failed, "a verdict")
    assert time.monotonic() - healed < FAST_S
    assert len(ch.rec.ready["stalled"]) + len(ch.rec.failed["stalled"]) == 1
    wait_until(lambda: ch.receiver.pending() == 0, "the reservation ended")
    assert ch.sender.pending() == 0
    send(ch, via, "next", tid(3), [4, 5], seed=25)
    assert time.monotonic() - healed < 2 * FAST_S
