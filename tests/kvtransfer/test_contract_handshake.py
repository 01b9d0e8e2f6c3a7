"""Contract, part 1, on every CPU backend: pages round-trip bit-exact into the reserved blocks,
and a peer that differs in any fingerprint field, or in its key, is refused before any page
moves."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import zmq

from kvtransfer import wire
from kvtransfer.sender import KVSender, TransferSpec
from tests.kvtransfer.harness import (
    KEY,
    LAYERS,
    MISMATCHES,
    OTHER_KEY,
    TIMEOUT_S,
    Channel,
    Recorder,
    Transport,
    drops,
    fingerprint,
    mismatched,
    random_pages,
    same_bits,
    stop_all,
    tid,
    wait_until,
)

AUTHS = {
    "crc": wire.FrameAuth(None),
    "hmac": wire.FrameAuth(KEY),
    "unchecked": wire.FrameAuth(None, checksum=False),
}


@pytest.mark.parametrize("auth", list(AUTHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_round_trip_is_bit_exact(
    make_channel: Callable[..., Channel], dtype: torch.dtype, auth: str
) -> None:
    """Layer by layer, then all layers in one PAGE: each lands bit-exact in its reserved
    blocks and nowhere else; both ends report success once, and count what moved."""
    ch = make_channel(dtype=dtype, receiver_auth=AUTHS[auth])
    assert ch.sender is not None
    before = ch.dst.kv.clone()
    plan = [("layerwise", [9, 4, 12], True), ("all-layers", [0, 15], False)]
    for n, (name, dst_blocks, layerwise) in enumerate(plan):
        pages = random_pages(ch.receiver_fp, len(dst_blocks), seed=n)
        ch.receiver.expect(tid(n), f"r-{name}", dst_blocks, 60.0)
        assert ch.receiver.pending() == 1
        ch.send(f"s-{name}", tid(n), dst_blocks, pages, layerwise=layerwise, first_token_id=42 + n)
        ch.rec.wait_sent(f"s-{name}")
        ch.rec.wait_ready(f"r-{name}")
        assert ch.rec.ready[f"r-{name}"] == [42 + n] and ch.rec.sent[f"s-{name}"] == [(True, "")]
        assert same_bits(ch.dst.kv[:, :, dst_blocks], pages), name
        before[:, :, dst_blocks] = pages
        assert same_bits(ch.dst.kv, before), f"{name}: a block outside the reservation changed"
        assert ch.receiver.pending() == 0
        wait_until(lambda: ch.sender is not None and ch.sender.pending() == 0, "the sender")
    assert not ch.rec.failed
    nbytes = 5 * ch.dst.bytes_per_block
    for stats in (ch.receiver.stats, ch.sender.stats):
        assert stats.backend == ch.transport.backend.value
        assert (stats.pages, stats.bytes, stats.transfers_completed) == (LAYERS + 1, nbytes, 2)
        assert not stats.failures
    assert not ch.receiver.stats.dropped_frames


def test_several_transfers_share_one_connection(make_channel: Callable[..., Channel]) -> None:
    """Interleaved transfers on one sender each land in their own blocks."""
    ch = make_channel()
    plan = {n: ([2 * n, 2 * n + 1], random_pages(ch.receiver_fp, 2, seed=10 + n)) for n in range(4)}
    for n, (blocks, _) in plan.items():
        ch.receiver.expect(tid(n), f"r{n}", blocks, 60.0)
    assert ch.sender is not None
    for n, (blocks, _) in plan.items():
        ch.sender.open(TransferSpec(f"s{n}", tid(n), ch.endpoint, tuple(blocks)))
    for layer in range(LAYERS):
        for n, (_, pages) in plan.items():
            ch.sender.send_pages(tid(n), layer, pages[layer : layer + 1])
    for n in reversed(plan):
        ch.sender.finish(tid(n), n)
    ch.rec.wait(lambda: len(ch.rec.sent) == 4 and len(ch.rec.ready) == 4, "every transfer")
    for n, (blocks, pages) in plan.items():
        assert ch.rec.ready[f"r{n}"] == [n] and ch.rec.sent[f"s{n}"] == [(True, "")]
        assert same_bits(ch.dst.kv[:, :, blocks], pages)


# -- handshake refusals -----------------------------------------------------------------------


def test_each_mismatched_field_is_refused(
    make_channel: Callable[..., Channel], transport: Transport
) -> None:
    """One sender per fingerprint field, each differing from the receiver in that field only
    (its pages follow its own fingerprint; the receiver's cache follows the receiver's). Every
    HELLO is refused naming the field, every transfer fails at its sender, nothing is written."""
    ch = make_channel(sender=False)
    before = ch.dst.kv.clone()
    senders: dict[str, KVSender] = {}
    try:
        for n, (field, value) in enumerate(MISMATCHES):
            theirs = mismatched(ch.receiver_fp, field, value)
            sender = KVSender(theirs, AUTHS["crc"], on_sent=ch.rec.on_sent)
            sender.start()
            senders[field] = sender
            ch.receiver.expect(tid(n), f"r-{field}", [1, 2], 60.0)
            sender.open(TransferSpec(field, tid(n), ch.endpoint, (1, 2)))
            pages = random_pages(theirs, 2, seed=n)
            for layer in range(theirs.num_layers):
                sender.send_pages(tid(n), layer, pages[layer : layer + 1])
            sender.finish(tid(n), 1)
        ch.rec.wait(lambda: len(ch.rec.sent) == len(MISMATCHES), "every refusal")
    finally:
        stop_all(list(senders.values()))
    for field, _ in MISMATCHES:
        [(ok, message)] = ch.rec.sent[field]
        assert not ok and message.startswith("incompatible: "), (field, message)
        assert f"prefill worker's {field} is " in message, (field, message)
        assert senders[field].pending() == 0, field
    assert ch.receiver.stats.failures == {"incompatible_peer": len(MISMATCHES)}
    assert ch.receiver.stats.pages == 0 and same_bits(ch.dst.kv, before)
    assert not ch.rec.ready and not ch.rec.failed
    assert ch.receiver.pending() == len(MISMATCHES)  # the owner releases its reservations
    for n in range(len(MISMATCHES)):
        assert ch.receiver.cancel(tid(n))


def test_sender_checks_the_receivers_fingerprint_too(transport: Transport) -> None:
    """A WELCOME carrying another fingerprint (a receiver built differently, or lying) makes
    the sender refuse that peer; nothing but the HELLO is sent."""
    if transport.backend.out_of_band:
        pytest.skip("the ROUTER below stands in for a ZeroMQ receiver only")
    router: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVTIMEO, int(TIMEOUT_S * 1000))
    router.bind(transport.bind())
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    mine = fingerprint(transport.backend)
    rec = Recorder()
    sender = KVSender(mine, AUTHS["crc"], on_sent=rec.on_sent, ack_timeout_s=TIMEOUT_S)
    sender.start()
    try:
        sender.open(TransferSpec("snd", tid(4), endpoint, (0,)))
        sender.send_pages(tid(4), 0, random_pages(mine, 1, seed=4))
        sender.finish(tid(4), 1)
        peer, frame = router.recv_multipart()
        hello = wire.decode(frame, AUTHS["crc"])
        assert isinstance(hello, wire.HandshakeHeader) and hello.kind is wire.FrameKind.HELLO
        assert hello.fields["fingerprint"] == mine.to_fields()
        theirs = mismatched(mine, "head_dim", 128)
        welcome = wire.HandshakeHeader(
            hello.transfer_id, wire.FrameKind.WELCOME, {"fingerprint": theirs.to_fields()}
        )
        router.send_multipart([peer, wire.encode(welcome, AUTHS["crc"])])
        ok, message = rec.wait_sent("snd")
        assert not ok and "head_dim" in message and sender.pending() == 0
        assert router.poll(100) == 0  # no page followed
    finally:
        sender.stop()
        router.close(linger=0)


def test_key_mismatch_is_refused(make_channel: Callable[..., Channel]) -> None:
    """A HELLO that does not verify is dropped and counted as unauthenticated; its sender gives
    up at its handshake timeout; nothing is written. Keyed receiver vs a sender with a CRC only,
    with no tag at all, or with another key; and a receiver without a key vs a keyed sender."""
    keyed = make_channel(receiver_auth=AUTHS["hmac"], sender=False)
    unkeyed = make_channel(receiver_auth=AUTHS["crc"], sender=False)
    cases = {
        "crc-only": (keyed, AUTHS["crc"]),
        "untagged": (keyed, AUTHS["unchecked"]),
        "other-key": (keyed, wire.FrameAuth(OTHER_KEY)),
        "keyed-sender": (unkeyed, AUTHS["hmac"]),
    }
    before = {id(ch): ch.dst.kv.clone() for ch in (keyed, unkeyed)}
    rec = Recorder()
    senders = []
    try:
        for n, (name, (ch, auth)) in enumerate(cases.items()):
            sender = KVSender(ch.receiver_fp, auth, on_sent=rec.on_sent, handshake_timeout_s=0.5)
            sender.start()
            senders.append(sender)
            ch.receiver.expect(tid(n), name, [3], 60.0)
            sender.open(TransferSpec(name, tid(n), ch.endpoint, (3,)))
            sender.send_pages(tid(n), 0, random_pages(ch.receiver_fp, 1, seed=n))
            sender.finish(tid(n), 1)
        rec.wait(lambda: len(rec.sent) == len(cases), "every sender to give up")
    finally:
        stop_all(senders)
    for name in cases:
        [(ok, message)] = rec.sent[name]
        assert not ok and "handshake_timeout" in message, (name, message)
    assert all(s.pending() == 0 for s in senders)
    wait_until(
        lambda: drops(keyed.receiver) >= 3 and drops(unkeyed.receiver) >= 1,
        "the HELLOs to be dropped",
    )
    for ch in (keyed, unkeyed):
        assert set(ch.receiver.stats.dropped_frames) == {"unauthenticated"}
        assert ch.receiver.stats.pages == 0 and same_bits(ch.dst.kv, before[id(ch)])
        assert not ch.rec.ready and not ch.rec.failed


def test_refusal_is_per_transfer_and_the_receiver_keeps_serving(
    make_channel: Callable[..., Channel],
) -> None:
    """A refused sender says HELLO again for its next transfer (the peer may have been
    reconfigured meanwhile), and the receiver goes on serving compatible peers."""
    ch = make_channel()
    bad = mismatched(ch.receiver_fp, "model", "another-model")
    rec = Recorder()
    wrong = KVSender(bad, AUTHS["crc"], on_sent=rec.on_sent, ack_timeout_s=TIMEOUT_S)
    wrong.start()
    try:
        for n in range(2):
            wrong.open(TransferSpec(f"s{n}", tid(10 + n), ch.endpoint, (1,)))
            wrong.finish(tid(10 + n), 1)
            ok, message = rec.wait_sent(f"s{n}")
            assert not ok and "model" in message
    finally:
        wrong.stop()
    assert ch.receiver.stats.failures["incompatible_peer"] == 2
    pages = random_pages(ch.receiver_fp, 1, seed=6)
    ch.receiver.expect(tid(12), "req", [1], 60.0)
    ch.send("good", tid(12), [1], pages)
    assert ch.rec.wait_sent("good") == (True, "")
    assert same_bits(ch.dst.kv[:, :, [1]], pages)
