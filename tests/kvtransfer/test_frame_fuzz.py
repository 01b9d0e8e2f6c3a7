"""Fuzzing the KV channel (issue #15): a short run of ``benchmarks/fuzz_kv.py``'s targets.

Frames of every kind and sealing, mutated, into the decoder (only MalformedFrameError comes
out; nothing whose tag does not verify is accepted); HELLOs and WELCOMEs with hostile fields
to a real receiver and a real sender; tickets mutated and parsed, and used by a real sender;
and real transfers under attack over real sockets (a relay tampering with a real sender's
messages, a handshaken peer's stream carrying tampered records, strangers sending garbage):
the receiver keeps serving, reservations end (completed with the pages sent, or failed),
nothing outside them is written. The regressions these runs found are pinned as examples.
The long run: ``.venv/bin/python -m benchmarks.fuzz_kv --examples 2000``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from benchmarks.fuzz_kv import TARGETS, finish, judge
from benchmarks.fuzz_kv_attack_cases import Attack, Rogue, nasty_reply
from benchmarks.fuzz_kv_common import NASTY_BODIES, PREFIX, SEALERS, VERIFIERS, Rig
from benchmarks.fuzz_kv_frames import FrameCase, check_frame, frame_cases, reseal
from benchmarks.fuzz_kv_handshakes import QUOTES, HelloCase, WelcomeCase
from benchmarks.fuzz_kv_tickets import (
    MINE,
    check_ticket_case,
    issued_ticket,
    parse_ticket,
    ticket_cases,
)
from kvtransfer import wire
from kvtransfer.datapath import Backend
from kvtransfer.sender import KVSender, TransferSpec
from server_runtime.proto_convert import ticket_to_proto
from tests.kvtransfer.harness import CRC, LAYERS, Recorder, stop_all, tid, wait_until

QUICK = settings(max_examples=300, deadline=None, database=None)
"""The pure targets: ~5 ms an input; failures shrink."""


def live(examples: int) -> settings:
    """The socket targets: ~30 ms an input (several seconds when something hangs), so no
    shrinking: a failure shows the input that made it."""
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
    )


def nasty_hello(body: bytes) -> FrameCase:
    """A HELLO whose body is ``body``, with a valid checksum: anyone can send it to an
    unkeyed receiver."""
    header = wire.HandshakeHeader(bytes(16), wire.FrameKind.HELLO, {})
    frame = wire.encode(header, SEALERS["xxh3"])
    bad = reseal([frame[: PREFIX.size] + body + bytes(wire.TAG_BYTES)], SEALERS["xxh3"])
    return FrameCase("xxh3", "xxh3", header, None, (frame,), tuple(bad), True, 0)


@QUICK
@given(frame_cases())
@example(nasty_hello(NASTY_BODIES[0]))  # RecursionError out of json.loads
@example(nasty_hello(NASTY_BODIES[1]))  # ValueError: more digits than int() takes
def test_frames_are_decoded_or_refused_cleanly(case: FrameCase) -> None:
    check_frame(case)


@QUICK
@given(ticket_cases())
def test_tickets_are_accepted_or_refused_cleanly(case: Any) -> None:
    check_ticket_case(case)


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[Callable[[str], Rig]]:
    made: list[Rig] = []

    def make(name: str) -> Rig:
        made.append(TARGETS[name].rig(tmp_path))
        return made[-1]

    yield make
    for rig in made:
        rig.close()


def run(rig: Rig, strategy: st.SearchStrategy[Any], examples: int, *pinned: Any) -> None:
    """``examples`` inputs (and the pinned ones) through ``rig``, then its closing checks."""

    def probe(case: Any) -> None:
        judge(rig, case)

    for case in pinned:
        probe = example(case)(probe)
    live(examples)(given(strategy)(probe))()
    finish(rig)


def test_hellos_with_hostile_fields_are_refused(make_rig: Callable[[str], Rig]) -> None:
    strategy = TARGETS["hello"].strategy(False)
    values: list[Any] = [5, None, [{"a": 1}]]  # TypeError out of Fingerprint.from_fields
    not_objects = [HelloCase((("fingerprint", value),), 0.0) for value in values]
    huge_time = HelloCase((("sent_at", 10**400),), 0.0)  # OverflowError: int to float
    long_refusal = HelloCase((("fingerprint.model", QUOTES),), 0.0)  # its REFUSE over 4 KB
    run(make_rig("hello"), strategy, 40, *not_objects, huge_time, long_refusal)


def test_welcomes_with_hostile_fields_fail_the_handshake(make_rig: Callable[[str], Rig]) -> None:
    welcome = wire.FrameKind.WELCOME
    pinned = [
        WelcomeCase(Backend.ZMQ, welcome, (("fingerprint", None),)),  # TypeError: not iterable
        WelcomeCase(Backend.STREAM, welcome, (("rendezvous", "x"),)),  # TypeError: str indices
        WelcomeCase(Backend.STREAM, welcome, (("rendezvous.stream_port", 2**70),)),  # Overflow
    ]
    run(make_rig("welcome"), TARGETS["welcome"].strategy(False), 16, *pinned)


def test_tickets_that_pass_the_checks_move_only_their_pages(make_rig: Callable[[str], Rig]) -> None:
    run(make_rig("ticket_transfers"), TARGETS["ticket_transfers"].strategy(False), 20)


def replies(*frames: bytes) -> Attack:
    """Hostile replies alone: a genuine transfer, with ``frames`` sent to its sender."""
    return Attack(LAYERS + 1, "replace", None, (), "", False, (), frames, None)


@pytest.mark.parametrize("target", ["zmq-gmac", "zmq-xxh3", "stream-gcm", "stream-gmac"])
def test_transfers_under_attack(make_rig: Callable[[str], Rig], target: str) -> None:
    """A tampered, replayed, dropped or reshaped message per transfer, strangers' garbage,
    hostile replies to the sender (zmq), a broken stream (stream): see
    ``fuzz_kv_attack_cases.Attack``."""
    auth = VERIFIERS[target.split("-")[1]]
    pinned = [replies(nasty_reply(auth, body)) for body in NASTY_BODIES[:2]] if not auth.key else []
    if target.startswith("stream"):
        pinned.append(
            Attack(1, "replace", None, (), "", False, (Rogue("stream"),), (), b"\xff" * 40)
        )
    run(make_rig(target), TARGETS[target].strategy(False), 40, *pinned)


def test_tickets_naming_nobody_leave_no_sockets_behind() -> None:
    """Tickets that pass the checks but name endpoints nobody serves (ports bound here, never
    listened on): each transfer fails at its handshake timeout, and the sender keeps no socket
    for them (it kept three descriptors per endpoint, for good: a few hundred such tickets used
    up a worker's descriptors)."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(60):  # held, so that nobody else listens there meanwhile
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        check_nobody_keeps_sockets([f"tcp://127.0.0.1:{port}" for port in ports])


def check_nobody_keeps_sockets(endpoints: list[str]) -> None:
    for endpoint in endpoints:
        taken, verdict = parse_ticket(
            ticket_to_proto(issued_ticket(bytes(16), endpoint, (1, 2, 3), 0)).SerializeToString()
        )
        assert taken is not None, verdict
    rec = Recorder()
    sender = KVSender(MINE, CRC, handshake_timeout_s=0.3, on_sent=rec.on_sent)
    sender.start()
    try:
        before = len(os.listdir("/proc/self/fd"))
        for n, endpoint in enumerate(endpoints):
            sender.open(TransferSpec(f"r{n}", tid(n), endpoint, (1, 2, 3)))
        rec.wait(lambda: len(rec.sent) == len(endpoints), "every transfer's verdict")
        assert all(not ok and "handshake_timeout" in why for [(ok, why)] in rec.sent.values())
        wait_until(lambda: len(os.listdir("/proc/self/fd")) < before + 10, "sockets closed")
        assert sender.pending() == 0
    finally:
        stop_all([sender])
