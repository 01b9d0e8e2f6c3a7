"""The ``weights`` field of the KV fingerprint: tiers that compute from different numbers
(``--weights float`` against ``gguf`` or ``int8``) refuse each other's pages, naming the field,
at the prefill worker's ticket check and at the KV channel's handshake; a worker's fingerprint
carries its model spec's label."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from core.ticket import (
    Fingerprint,
    IncompatiblePeerError,
    TransferTicket,
    check_match,
    check_ticket,
)
from engine.kv_cache import KVCache
from engine.model_files import describe_model
from kvtransfer import wire
from kvtransfer.config import Backend, TransferConfig, fingerprint_for
from kvtransfer.sender import KVSender, TransferSpec
from tests.kvtransfer.harness import Channel, Transport, fingerprint, random_pages, stop_all, tid
from tests.support.tiny_models import build_tiny_model

FLOAT = fingerprint(Backend.ZMQ)
GGUF = dataclasses.replace(FLOAT, weights="gguf:Q4_1+Q8_0")
INT8 = dataclasses.replace(FLOAT, weights="int8:q8_0")
PAIRS = [(FLOAT, GGUF), (GGUF, FLOAT), (FLOAT, INT8), (INT8, GGUF)]


def test_the_default_is_float() -> None:
    assert FLOAT.weights == "float"


@pytest.mark.parametrize(("mine", "theirs"), PAIRS, ids=lambda fp: fp.weights)
def test_check_match_names_weights_and_both_values(mine: Fingerprint, theirs: Fingerprint) -> None:
    assert {
        f.name
        for f in dataclasses.fields(Fingerprint)
        if getattr(mine, f.name) != getattr(theirs, f.name)
    } == {"weights"}
    with pytest.raises(IncompatiblePeerError) as info:
        check_match(mine, theirs, "decode worker")
    message = str(info.value)
    assert message.startswith("decode worker's weights is "), message
    assert repr(theirs.weights) in message and repr(mine.weights) in message


@pytest.mark.parametrize("weights", ["float", "gguf:Q4_1+Q8_0", "int8:q8_0"])
def test_same_weights_match(weights: str) -> None:
    fp = dataclasses.replace(FLOAT, weights=weights)
    check_match(fp, dataclasses.replace(fp), "decode worker")


def _ticket(fp: Fingerprint) -> TransferTicket:
    return TransferTicket(bytes(16), "tcp://127.0.0.1:5555", (4, 1, 6), 30.0, fp)


def test_prefill_float_refuses_a_gguf_decode_workers_ticket() -> None:
    check_ticket(_ticket(FLOAT), FLOAT, num_prompt_blocks=3)  # the same ticket, float: fine
    with pytest.raises(IncompatiblePeerError, match="decode worker's weights is 'gguf:Q4_1"):
        check_ticket(_ticket(GGUF), FLOAT, num_prompt_blocks=3)


def test_a_peer_without_the_field_is_refused_naming_it() -> None:
    """An older build's HELLO (no ``weights``)."""
    fields = FLOAT.to_fields()
    del fields["weights"]
    with pytest.raises(IncompatiblePeerError, match="lacks weights"):
        Fingerprint.from_fields(fields)
    assert Fingerprint.from_fields(GGUF.to_fields()) == GGUF


def test_the_kv_handshake_refuses_a_sender_computing_from_other_weights(tmp_path: Path) -> None:
    """A float receiver (decode) and a gguf sender (prefill): the HELLO is refused naming
    ``weights``; the transfer fails at its sender; no page lands."""
    ch = Channel(Transport("tcp", Backend.ZMQ, tmp_path), sender=False)
    before = ch.dst.kv.clone()
    crc = wire.FrameAuth(None)
    sender = KVSender(GGUF, crc, on_sent=ch.rec.on_sent)
    sender.start()
    try:
        ch.receiver.expect(tid(1), "r", [1, 2], 60.0)
        sender.open(TransferSpec("s", tid(1), ch.endpoint, (1, 2)))
        pages = random_pages(GGUF, 2, seed=1)
        for layer in range(GGUF.num_layers):
            sender.send_pages(tid(1), layer, pages[layer : layer + 1])
        sender.finish(tid(1), 1)
        ch.rec.wait(lambda: "s" in ch.rec.sent, "the refusal")
        assert ch.receiver.cancel(tid(1))  # still reserved: its owner releases it
    finally:
        stop_all([sender])
        ch.close()
    [(ok, message)] = ch.rec.sent["s"]
    assert not ok and message.startswith("incompatible: "), message
    assert "prefill worker's weights is 'gguf:Q4_1+Q8_0'" in message, message
    assert ch.receiver.stats.failures == {"incompatible_peer": 1}
    assert ch.receiver.stats.pages == 0 and torch.equal(ch.dst.kv, before)
    assert not ch.rec.ready


@pytest.mark.parametrize("label", ["float", "gguf:Q4_1+Q8_0", "int8:q8_0"])
def test_a_workers_fingerprint_carries_its_spec_s_weights(tmp_path: Path, label: str) -> None:
    path = build_tiny_model(tmp_path / "tiny", "llama", vocab_size=512, seed=2)
    spec = dataclasses.replace(describe_model("tiny", path), weights=label)
    kv = KVCache(
        spec.num_layers, 4, 16, spec.num_kv_heads, spec.head_dim, torch.float32, torch.device("cpu")
    )
    fp = fingerprint_for(spec, kv, TransferConfig(insecure=True))
    assert fp.weights == label
    other = fingerprint_for(
        dataclasses.replace(spec, weights="float"), kv, TransferConfig(insecure=True)
    )
    assert (fp == other) == (label == "float")
