"""check_ticket: a prefill worker refuses a ticket it cannot honour before computing anything,
naming what does not match."""

from __future__ import annotations

import dataclasses

import pytest

from core.ticket import Fingerprint, IncompatiblePeerError, TransferTicket, check_ticket
from kvtransfer.datapath import Backend
from tests.kvtransfer.harness import MISMATCHES, fingerprint, mismatched

MINE = fingerprint(Backend.ZMQ)


def ticket(fp: Fingerprint = MINE, **overrides: object) -> TransferTicket:
    fields: dict[str, object] = dict(
        transfer_id=bytes(16),
        kv_endpoint="tcp://127.0.0.1:5555",
        block_ids=(4, 1, 6),
        lease_s=30.0,
        fingerprint=fp,
    )
    fields.update(overrides)
    return TransferTicket(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "endpoint", ["tcp://10.0.0.1:7000", "ipc:///tmp/pdserve-kv.sock", "inproc://kv-tests"]
)
def test_matching_ticket_passes(endpoint: str) -> None:
    check_ticket(ticket(kv_endpoint=endpoint), MINE, num_prompt_blocks=3)


@pytest.mark.parametrize(("field", "value"), MISMATCHES, ids=[f for f, _ in MISMATCHES])
def test_each_mismatched_field_is_named(field: str, value: object) -> None:
    theirs = mismatched(MINE, field, value)
    with pytest.raises(IncompatiblePeerError, match=field) as info:
        check_ticket(ticket(theirs), MINE, num_prompt_blocks=3)
    message = str(info.value)
    assert repr(getattr(theirs, field)) in message and repr(getattr(MINE, field)) in message


def test_first_mismatch_is_reported() -> None:
    theirs = dataclasses.replace(MINE, head_dim=1, dtype="float16", block_size=2)
    with pytest.raises(IncompatiblePeerError, match="dtype"):
        check_ticket(ticket(theirs), MINE, num_prompt_blocks=3)


@pytest.mark.parametrize("block_ids", [(), (1, 2), (1, 2, 3, 4)])
def test_block_count_must_match_the_prompt(block_ids: tuple[int, ...]) -> None:
    with pytest.raises(IncompatiblePeerError, match=rf"reserved {len(block_ids)} blocks.*needs 3"):
        check_ticket(ticket(block_ids=block_ids), MINE, num_prompt_blocks=3)


@pytest.mark.parametrize(
    "endpoint", ["http://host:1", "", "127.0.0.1:5555", "TCP://host:1", "udp://h:1"]
)
def test_unsupported_endpoint_scheme(endpoint: str) -> None:
    with pytest.raises(IncompatiblePeerError, match="endpoint"):
        check_ticket(ticket(kv_endpoint=endpoint), MINE, num_prompt_blocks=3)
