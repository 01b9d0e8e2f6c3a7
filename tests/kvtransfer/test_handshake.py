"""Fingerprints: what two ends of a KV transfer must agree on, and how a mismatch is named."""

from __future__ import annotations

import pytest

from core.ticket import LAYOUT, Fingerprint, IncompatiblePeerError, check_match
from kvtransfer import wire
from kvtransfer.datapath import Backend
from kvtransfer.handshake import (
    HEADER_ONLY,
    MAX_SENDER_ID_CHARS,
    TAGGED,
    HelloGuard,
    StaleHelloError,
    hello_fields,
    payload_integrity,
    sender_of,
)
from tests.kvtransfer.harness import MISMATCHES, fingerprint, mismatched

MINE = fingerprint(Backend.ZMQ)


def test_defaults_are_this_build_s_layout_and_protocol() -> None:
    assert MINE.layout == LAYOUT
    assert MINE.protocol_version == wire.PROTOCOL_VERSION
    assert Backend(MINE.backend) is Backend.ZMQ


def test_fields_round_trip() -> None:
    assert Fingerprint.from_fields(MINE.to_fields()) == MINE
    extra = {**MINE.to_fields(), "added_in_a_later_version": True}
    assert Fingerprint.from_fields(extra) == MINE  # unknown fields are ignored


@pytest.mark.parametrize("missing", ["model", "protocol_version", "layout"])
def test_missing_fields_are_named(missing: str) -> None:
    data = MINE.to_fields()
    del data[missing]
    with pytest.raises(IncompatiblePeerError, match=f"lacks {missing}"):
        Fingerprint.from_fields(data)


@pytest.mark.parametrize(("field", "value"), MISMATCHES, ids=[f for f, _ in MISMATCHES])
def test_check_match_names_the_field_and_both_values(field: str, value: object) -> None:
    theirs = mismatched(MINE, field, value)
    check_match(MINE, MINE, "peer")
    with pytest.raises(IncompatiblePeerError, match=f"peer's {field} is") as info:
        check_match(MINE, theirs, "peer")
    message = str(info.value)
    assert repr(getattr(theirs, field)) in message and repr(getattr(MINE, field)) in message


def test_a_value_of_another_type_is_a_mismatch() -> None:
    theirs = Fingerprint.from_fields({**MINE.to_fields(), "block_size": str(MINE.block_size)})
    with pytest.raises(IncompatiblePeerError, match="block_size"):
        check_match(MINE, theirs, "peer")


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_hello_is_accepted_once_while_fresh() -> None:
    clock = _Clock(1_000_000.0)
    guard = HelloGuard(max_age_s=120.0, clock=clock)
    hello = hello_fields(MINE, clock=clock)
    assert hello["sent_at"] == clock.now and hello["fingerprint"] == MINE.to_fields()
    guard.admit(b"a" * 16, hello)
    clock.now += 30
    with pytest.raises(StaleHelloError, match="seen before"):
        guard.admit(b"a" * 16, hello)
    guard.admit(b"b" * 16, hello_fields(MINE, clock=clock))  # another HELLO: fine
    assert issubclass(StaleHelloError, IncompatiblePeerError)  # refused like a mismatch


@pytest.mark.parametrize("skew", [-121.0, 121.0, 10_000.0])
def test_a_hello_far_from_this_clock_is_refused(skew: float) -> None:
    clock = _Clock(1_000_000.0)
    guard = HelloGuard(max_age_s=120.0, clock=clock)
    with pytest.raises(StaleHelloError, match="clocks disagree"):
        guard.admit(b"a" * 16, {"sent_at": clock.now - skew})
    guard.admit(b"a" * 16, {"sent_at": clock.now - skew / 2 if abs(skew) < 240 else clock.now})


@pytest.mark.parametrize("sent_at", [None, "now", True, float("nan")])
def test_a_hello_without_a_usable_send_time_is_refused(sent_at: object) -> None:
    fields = {} if sent_at is None else {"sent_at": sent_at}
    with pytest.raises(StaleHelloError, match="no send time"):
        HelloGuard().admit(b"a" * 16, fields)


def test_remembered_hellos_are_forgotten_once_they_could_not_be_fresh() -> None:
    clock = _Clock(1_000_000.0)
    guard = HelloGuard(max_age_s=120.0, clock=clock)
    for n in range(100):
        guard.admit(n.to_bytes(16, "big"), {"sent_at": clock.now})
    clock.now += 241  # past sent + 2 * max_age: the old ones could no longer pass the age check
    guard.admit(b"new" + bytes(13), {"sent_at": clock.now})
    assert len(guard._seen) == 1


@pytest.mark.parametrize(
    ("fields", "who"),
    [
        (hello_fields(MINE, sender="ab12"), "sender:ab12"),
        (hello_fields(MINE), "connection:0102"),  # an older pdserve: the connection
        ({"sender": 7}, "connection:0102"),
        ({"sender": ""}, "connection:0102"),
        ({"sender": "x" * (MAX_SENDER_ID_CHARS + 1)}, "connection:0102"),
        ({"sender": ["ab12"]}, "connection:0102"),
    ],
)
def test_a_hello_names_its_sender_or_its_connection_stands_in(fields: dict, who: str) -> None:
    assert sender_of(fields, b"\x01\x02") == who


def test_the_hello_states_what_page_tags_cover() -> None:
    assert payload_integrity("nccl") == HEADER_ONLY  # the payload never reaches the host
    for backend in (Backend.ZMQ, Backend.STREAM, Backend.GLOO):
        assert payload_integrity(backend.value) == TAGGED
        assert hello_fields(fingerprint(backend))["payload_integrity"] == TAGGED
    assert hello_fields(fingerprint(Backend.NCCL))["payload_integrity"] == HEADER_ONLY
