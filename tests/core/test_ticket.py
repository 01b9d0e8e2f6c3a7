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


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://[::1]:5555",
        "tcp://decode-0.kv.default.svc.cluster.local:5600",
        "tcp://localhost:65535",
        "tcp://10.0.0.1:1",
        "ipc:///" + "x" * 100,
    ],
)
def test_endpoints_a_sender_can_connect_to_pass(endpoint: str) -> None:
    check_ticket(ticket(kv_endpoint=endpoint), MINE, num_prompt_blocks=3)


@pytest.mark.parametrize(
    ("endpoint", "why"),
    [
        ("tcp://127.0.0.1:99999", "port 99999"),
        ("tcp://127.0.0.1:65536", "port 65536"),
        ("tcp://127.0.0.1:0", "port 0"),
        ("tcp://-:5", "host '-'"),
        ("tcp://host-:5", "host 'host-'"),
        ("tcp://a..b:5", "host 'a..b'"),
        ("tcp://" + "a" * 64 + ":5", "host"),
        ("tcp://" + "a." * 127 + "b:5", "host"),
        ("tcp://999.0.0.1:5", "host '999.0.0.1'"),
        ("tcp://[zz::1]:5", "endpoint"),
        ("tcp://[1:2:3:4:5:6:7:8:9]:5", "host"),
        ("tcp://[::1]]:5", "endpoint"),
        ("tcp://[::1:5", "endpoint"),
        ("tcp://:5", "endpoint"),
        ("ipc:///" + "x" * 120, "ipc path"),
    ],
)
def test_endpoints_no_sender_can_connect_to_are_refused(endpoint: str, why: str) -> None:
    """Refused before the prefill computes anything (not at the handshake's timeout)."""
    with pytest.raises(IncompatiblePeerError, match=why):
        check_ticket(ticket(kv_endpoint=endpoint), MINE, num_prompt_blocks=3)
