"""Fingerprints: what two ends of a KV transfer must agree on, and how a mismatch is named."""

from __future__ import annotations

import pytest

from kvtransfer import wire
from kvtransfer.datapath import Backend
from kvtransfer.handshake import LAYOUT, Fingerprint, IncompatiblePeerError, check_match
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
