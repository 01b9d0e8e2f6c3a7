"""Contract, part 4, on every CPU backend: a decode worker that does not drain slows its
senders down instead of growing their memory. ``send_pages`` blocks while the peer's queued
bytes are over budget and gives up with :class:`TransferBackpressureError` after the ack timeout,
holding on to none of the pages it refused."""

from __future__ import annotations

import gc
import random
import weakref

import pytest
import zmq

from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import KVSender, TransferBackpressureError, TransferSpec
from tests.kvtransfer.harness import (
    CRC,
    GROUP_TIMEOUT_S,
    TIMEOUT_S,
    Recorder,
    Transport,
    cache_for,
    fingerprint,
    random_pages,
    same_bits,
    stop_all,
    tid,
    wait_until,
)


def endpoint_nobody_serves(transport: Transport) -> str:
    """Where the decode worker will listen once it starts (senders may connect before).

    A tcp port below the kernel's ephemeral range: while nothing listens, the sender's
    reconnects could otherwise draw the target port as their own source port, and a TCP socket
    connected to itself (simultaneous open) would take the HELLO and never let go of it."""
    bind = transport.bind()
    if not bind.startswith("tcp://"):
        return bind
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
        ephemeral_low = int(ports.read().split()[0])
    probe: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    try:
        for port in random.Random().sample(range(10000, ephemeral_low), 50):
            try:
                probe.bind(f"tcp://127.0.0.1:{port}")
            except zmq.ZMQError:
                continue  # taken
            probe.unbind(f"tcp://127.0.0.1:{port}")
            return f"tcp://127.0.0.1:{port}"
    finally:
        probe.close(linger=0)
    raise RuntimeError("no free tcp port below the ephemeral range")


def test_send_pages_blocks_then_gives_up_while_the_receiver_is_down(
    transport: Transport,
) -> None:
    fp = fingerprint(transport.backend)
    endpoint = endpoint_nobody_serves(transport)
    pages = random_pages(fp, 2, seed=1)
    layer_bytes = pages[:1].numel() * pages.element_size()
    rec = Recorder()
    sender = KVSender(
        fp,
        CRC,
        ack_timeout_s=0.2,  # how long send_pages waits for room
        handshake_timeout_s=TIMEOUT_S,  # the HELLO waits for the receiver to come up
        max_queued_bytes=2 * layer_bytes,
        on_sent=rec.on_sent,
    )
    sender.start()
    receiver: KVReceiver | None = None
    try:
        sender.open(TransferSpec("stalled", tid(1), endpoint, (0, 1)))
        sender.send_pages(tid(1), 0, pages[0:1])  # within budget: queued at once
        sender.send_pages(tid(1), 1, pages[1:2])
        refused = []
        for _ in range(2):
            page = pages[2:3].clone()
            refused.append(weakref.ref(page))
            with pytest.raises(TransferBackpressureError, match="not draining"):
                sender.send_pages(tid(1), 2, page)
            del page
        gc.collect()  # tracebacks of the caught errors may hold the page in a reference cycle
        assert all(ref() is None for ref in refused), "the sender kept a page it refused"
        assert sender.pending() == 1 and not rec.sent

        # the decode worker comes up: the queued pages land, then the abort the refusal queued
        dst = cache_for(fp, seed=2)
        before = dst.kv.clone()
        receiver = KVReceiver(
            endpoint, dst, fp, CRC, rec.on_ready, rec.on_failed, group_timeout_s=GROUP_TIMEOUT_S
        )
        receiver.expect(tid(1), "stalled", [0, 1], 60.0)
        receiver.start()
        assert rec.wait_sent("stalled") == (False, "aborted: backpressure timeout")
        assert "backpressure timeout" in rec.wait_failed("stalled")
        before[:2, :, [0, 1]] = pages[:2]
        assert same_bits(dst.kv, before)
        assert sender.pending() == 0 and receiver.pending() == 0

        # the queued bytes were released: a full budget goes through again without waiting
        # (no DONE here: its ack would be held to the short ack timeout)
        receiver.expect(tid(2), "next", [2, 3], 60.0)
        sender.open(TransferSpec("next", tid(2), endpoint, (2, 3)))
        sender.send_pages(tid(2), 0, pages[0:1])
        sender.send_pages(tid(2), 1, pages[1:2])
        wait_until(lambda: receiver is not None and receiver.stats.pages == 4, "the pages")
        assert same_bits(dst.kv[:2, :, [2, 3]], pages[:2])
        sender.abort(tid(2), "test over")
        assert rec.wait_sent("next") == (False, "aborted: test over")
    finally:
        stop_all([sender, *([receiver] if receiver is not None else [])])
