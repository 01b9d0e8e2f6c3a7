"""Property-based fuzzing of the KV channel: frames, handshakes and tickets (hypothesis).

    .venv/bin/python -m benchmarks.fuzz_kv --examples 2000 [--targets frames,hello,...]
                                           [--replay-live] [--json fuzz_kv.json]

Run it from the repository root (``-m``): the socket targets drive the real receivers and
senders of ``tests/kvtransfer/harness.py``. ``--examples`` inputs per target (the socket targets
take a tenth of that, at least 20):

- ``frames``: valid frames of every kind, sealed every way (no tag, XXH3, GMAC, AES-GCM, another
  fleet's key), mutated (bit flips, cuts, growths, overwritten struct fields, arbitrary bodies,
  arbitrary bytes; re-sealed or not) into ``wire.decode`` (whole and deferred), ``verify_page``,
  ``payload_check`` and the out-of-band helpers;
- ``hello``: HELLOs with hostile fields (fingerprints that are not objects, send times that are
  huge, NaN, text), and replays of them, to a real receiver;
- ``welcome``: WELCOMEs and REFUSEs with hostile fields and rendezvous offers, from a hostile
  decode worker, to a real sender (zmq and stream fingerprints);
- ``tickets``: the ticket a decode worker issues, mutated (fields and serialized bytes) and
  parsed as a prefill worker does (protobuf, the servicer's id check, ``check_ticket``);
- ``ticket_transfers``: mutated tickets that pass those checks, used by a real sender;
- ``zmq-gmac``, ``zmq-xxh3``: a relay between a real sender and receiver tampers with one
  message of each transfer (mutated, replaced, dropped, replayed, swapped) and sends the sender
  hostile replies, while a stranger's DEALER and a raw TCP socket send garbage;
- ``stream-gcm``, ``stream-gmac``, ``stream-xxh3``: a handshaken peer's stream carries mutated
  records (and unreadable ones, which break the link), strangers write to the stream listener.

A *finding* is any exception but ``MalformedFrameError`` out of the decoder, a frame whose tag
does not verify accepted, an intact one refused, a transfer with no verdict, sender and receiver
disagreeing, a reservation or transfer left pending, a block outside the reservation changed, a
transfer completed with bytes other than the pages sent (where tags make that impossible), an
``internal_error`` drop, or an endpoint that stops serving. ``--replay-live`` also lets a
stranger replay frames captured from the live transfer (harmless: a reservation belongs to the
sender that first wrote to it, see ``kvtransfer.reservations``; but on an unkeyed channel a
stranger that replayed a HELLO is a peer like any other, so its replays are judged as a buggy
fleet member's writes are). Prints a summary (inputs tried and outcomes per target, findings
with their inputs); exits 1 on findings.
``tests/kvtransfer/test_frame_fuzz.py`` runs the same targets as a short CI smoke.

This module is the run (targets, settings, the tally); the targets live beside it:
``fuzz_kv_common`` (sealers, findings, the rig protocol), ``fuzz_kv_frames``,
``fuzz_kv_handshakes`` (hello, welcome), ``fuzz_kv_tickets``, ``fuzz_kv_attack_cases`` (the
relay and the attacks' inputs) and ``fuzz_kv_attacks`` (their rigs).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from benchmarks.fuzz_kv_attack_cases import attacks
from benchmarks.fuzz_kv_attacks import StreamRig, ZmqRig
from benchmarks.fuzz_kv_common import Fatal, Finding, PureRig, Rig
from benchmarks.fuzz_kv_frames import check_frame, frame_cases
from benchmarks.fuzz_kv_handshakes import HELLO_CASES, HelloRig, WelcomeRig, welcome_cases
from benchmarks.fuzz_kv_tickets import (
    TICKET_USES,
    TicketTransferRig,
    check_ticket_case,
    ticket_cases,
)


@dataclass(frozen=True)
class Target:
    name: str
    strategy: Callable[[bool], st.SearchStrategy[Any]]  # (replay_live) -> inputs
    rig: Callable[[Path], Rig]
    per_example: int  # how many of ``--examples`` one input costs (socket targets: 10)


def attack_target(backend: str, auth_name: str) -> Target:
    stream = backend == "stream"
    rig: type[ZmqRig | StreamRig] = StreamRig if stream else ZmqRig
    return Target(
        f"{backend}-{auth_name}",
        lambda live: attacks(auth_name, stream, live),
        lambda scratch: rig(auth_name, scratch),
        10,
    )


TARGETS = {
    t.name: t
    for t in [
        Target("frames", lambda _: frame_cases(), lambda _: PureRig(check_frame), 1),
        Target("hello", lambda _: HELLO_CASES, HelloRig, 10),
        Target("welcome", lambda _: welcome_cases(), WelcomeRig, 10),
        Target("tickets", lambda _: ticket_cases(), lambda _: PureRig(check_ticket_case), 1),
        Target("ticket_transfers", lambda _: TICKET_USES, TicketTransferRig, 10),
        attack_target("zmq", "gmac"),
        attack_target("zmq", "xxh3"),
        attack_target("stream", "gcm"),
        attack_target("stream", "gmac"),
        attack_target("stream", "xxh3"),
    ]
}


def fuzz_settings(examples: int) -> settings:
    """No deadline (sockets on a shared machine), no shrinking (a finding is recorded with its
    input, not raised), no example database."""
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=(Phase.generate,),
        suppress_health_check=list(HealthCheck),
    )


@dataclass
class Tally:
    tried: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=dict)
    findings: list[dict[str, str]] = field(default_factory=list)

    def finding(self, target: str, what: str, shown: str) -> None:
        self.findings.append({"target": target, "finding": what[:500], "input": shown[:800]})


@contextmanager
def rig_for(target: Target, scratch: Path) -> Iterator[Rig]:
    rig = target.rig(scratch)
    try:
        yield rig
    finally:
        rig.close()


def judge(rig: Rig, case: Any) -> str:
    """One input through ``rig``: its outcome; raises Finding."""
    if rig.errors is None:
        return rig.check(case)
    with rig.errors.watch():
        return rig.check(case)


def finish(rig: Rig) -> None:
    if rig.errors is None:
        return rig.finish()
    with rig.errors.watch():
        rig.finish()


def run_target(
    target: Target, examples: int, replay_live: bool, scratch: Path, tally: Tally
) -> None:
    started = time.monotonic()
    with rig_for(target, scratch) as rig:
        dead: list[Fatal] = []

        @fuzz_settings(examples)
        @given(target.strategy(replay_live))
        def probe(case: Any) -> None:
            if dead:
                return
            tally.tried[target.name] += 1
            try:
                outcome = judge(rig, case)
            except Exception as exc:  # a Finding, or a checker that could not run: both count
                what = str(exc) if isinstance(exc, Finding) else f"{type(exc).__name__}: {exc}"
                tally.finding(target.name, what, repr(case))
                outcome = "FINDING"
                if isinstance(exc, Fatal):
                    dead.append(exc)
            tally.outcomes[f"{target.name} {outcome}"] += 1

        probe()
        try:
            if not dead:
                finish(rig)
        except Exception as exc:
            tally.finding(target.name, f"at the end: {exc}", "")
    tally.seconds[target.name] = round(time.monotonic() - started, 1)
    print(
        f"{target.name}: {tally.tried[target.name]} inputs, {tally.seconds[target.name]} s",
        file=sys.stderr,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="inputs per pure target")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated")
    parser.add_argument("--replay-live", action="store_true", help="strangers replay live frames")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    tally = Tally()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kv-fuzz-") as scratch:
        for name in args.targets.split(","):
            target = TARGETS[name]
            examples = max(20, args.examples // target.per_example)
            run_target(target, examples, args.replay_live, Path(scratch), tally)
    summary = {
        "examples_per_pure_target": args.examples,
        "seconds": round(time.monotonic() - started, 1),
        "seconds_per_target": tally.seconds,
        "tried": dict(tally.tried),
        "outcomes": dict(sorted(tally.outcomes.items())),
        "findings": tally.findings,
    }
    print(json.dumps(summary, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    return 1 if tally.findings else 0


if __name__ == "__main__":
    sys.exit(main())
