"""Contract, part 5: encrypted pages (``--kv-encrypt``) on every CPU backend that carries them
(zmq, stream; gloo refuses the combination), and model fingerprints that tell fine-tunes of one
architecture apart at the handshake."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from engine.model_files import describe_model
from kvtransfer import wire
from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import KVSender, TransferSpec
from tests.kvtransfer.harness import (
    KEY,
    Channel,
    Transport,
    cache_for,
    fingerprint,
    random_pages,
    same_bits,
    tid,
    wait_until,
)
from tests.kvtransfer.test_contract_integrity import BLOCKS, armed, assert_untouched
from tests.support.tiny_models import build_tiny_model

GCM = wire.FrameAuth(KEY, encrypt=True)
GMAC = wire.FrameAuth(KEY)


@pytest.fixture
def encrypted(make_channel: Callable[..., Channel], transport: Transport) -> Channel:
    if transport.backend.out_of_band and not transport.name.startswith("stream"):
        pytest.skip("gloo/nccl cannot carry encrypted pages: see the refusal test")
    return make_channel(receiver_auth=GCM)


def test_encrypted_pages_round_trip_bit_exact(encrypted: Channel) -> None:
    ch = encrypted
    pages = random_pages(ch.receiver_fp, 3, seed=4)
    before = ch.dst.kv.clone()
    ch.receiver.expect(tid(0), "r", [9, 4, 12], 60.0)
    ch.send("s", tid(0), [9, 4, 12], pages, first_token_id=42)
    ch.rec.wait_sent("s")
    ch.rec.wait_ready("r")
    assert ch.rec.sent["s"] == [(True, "")] and ch.rec.ready["r"] == [42]
    assert same_bits(ch.dst.kv[:, :, [9, 4, 12]], pages)
    before[:, :, [9, 4, 12]] = pages
    assert same_bits(ch.dst.kv, before) and not ch.receiver.stats.dropped_frames


def test_an_altered_ciphertext_is_refused_and_the_transfer_fails_cleanly(
    encrypted: Channel,
) -> None:
    """A page whose ciphertext was altered does not decrypt: it is dropped as unauthenticated
    and counts for nothing; DONE then fails the transfer (its reservation is gone: no block
    is leaked) and the decode side reports the failure."""
    ch = encrypted
    peer, pages, before = armed(ch)
    header, payload = peer.page(tid(1), pages[:1], BLOCKS)
    assert payload != pages[:1].numpy().tobytes()  # the ciphertext travels
    for index in (0, len(payload) // 2, -1):
        altered = bytearray(payload)
        altered[index] ^= 0x04
        peer.send_page(header, bytes(altered))
    assert_untouched(ch, peer, before, unauthenticated=3)
    peer.done(tid(1), first_token_id=3)
    ack = peer.recv_ack()
    assert ack.status is wire.AckStatus.FAILED and "incomplete" in ack.message
    ch.rec.wait(lambda: "req" in ch.rec.failed, "on_failed")
    assert ch.receiver.pending() == 0 and not ch.rec.ready


def test_encryption_on_one_end_only_moves_nothing(
    make_channel: Callable[..., Channel], transport: Transport
) -> None:
    """An encrypting sender's HELLO does not verify at a receiver that does not decrypt: it is
    dropped (counted) and the sender's transfer fails at its handshake timeout, unwritten."""
    if transport.backend.out_of_band and not transport.name.startswith("stream"):
        pytest.skip("gloo/nccl cannot carry encrypted pages")
    ch = make_channel(receiver_auth=GMAC, sender_auth=GCM, handshake_timeout_s=0.5)
    before = ch.dst.kv.clone()
    ch.receiver.expect(tid(0), "r", [1, 2], 60.0)
    ch.send("s", tid(0), [1, 2], random_pages(ch.receiver_fp, 2, seed=1))
    ch.rec.wait_sent("s")
    ok, reason = ch.rec.sent["s"][0]
    assert not ok and "handshake" in reason
    assert ch.receiver.stats.dropped_frames["unauthenticated"] >= 1
    assert same_bits(ch.dst.kv, before) and not ch.rec.ready


def test_gloo_refuses_encryption(transport: Transport) -> None:
    if transport.name != "gloo":
        pytest.skip("the gloo transport's refusal")
    fp = fingerprint(transport.backend)
    with pytest.raises(ValueError, match="cannot travel over gloo"):
        KVReceiver(transport.bind(), cache_for(fp), fp, GCM, lambda *_: None, lambda *_: None)
    with pytest.raises(ValueError, match="cannot travel over gloo"):
        KVSender(fp, GCM)


def test_fine_tunes_of_one_architecture_refuse_each_other(
    make_channel: Callable[..., Channel], transport: Transport, tmp_path: Path
) -> None:
    """Two model folders with the same config, file names and sizes but other weights: their
    fingerprints differ (the weights' content is hashed), so the decode worker refuses the
    prefill worker's HELLO naming the model, and nothing is written."""
    if transport.name != "tcp":
        pytest.skip("the handshake is the same on every transport")
    a = describe_model("a", build_tiny_model(tmp_path / "a", "llama", vocab_size=512, seed=0))
    b = describe_model("b", build_tiny_model(tmp_path / "b", "llama", vocab_size=512, seed=1))
    assert a.fingerprint != b.fingerprint
    ch = make_channel(
        receiver_fp=fingerprint(transport.backend, model=a.fingerprint),
        sender_fp=fingerprint(transport.backend, model=b.fingerprint),
    )
    before = ch.dst.kv.clone()
    ch.receiver.expect(tid(0), "r", [1, 2], 60.0)
    assert ch.sender is not None
    ch.sender.open(TransferSpec("s", tid(0), ch.endpoint, (1, 2)))
    ch.sender.finish(tid(0), 1)
    ch.rec.wait_sent("s")
    ok, reason = ch.rec.sent["s"][0]
    assert not ok and "model" in reason and a.fingerprint in reason
    wait_until(lambda: ch.receiver.stats.failures.get("incompatible_peer", 0) == 1, "refusal")
    assert same_bits(ch.dst.kv, before) and not ch.rec.ready
