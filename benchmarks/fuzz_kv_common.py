"""What every target of ``benchmarks.fuzz_kv`` shares: the ways a frame is sealed and verified,
hostile values, what counts as a finding (:class:`Finding`, :func:`expect`), and the
:class:`Rig` protocol a target's inputs are checked on (rigs drive real endpoints; a finding is
recorded with its input, never raised out of the run)."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import zmq
from hypothesis import strategies as st

from kvtransfer import wire
from kvtransfer.metrics import TransferStats
from tests.kvtransfer.harness import (
    KEY,
    OTHER_KEY,
)

SEALERS: dict[str, wire.FrameAuth] = {
    "none": wire.FrameAuth(None, checksum=False),
    "xxh3": wire.FrameAuth(None),
    "gmac": wire.FrameAuth(KEY),
    "gcm": wire.FrameAuth(KEY, encrypt=True),
    "gmac-other": wire.FrameAuth(OTHER_KEY),
    "gcm-other": wire.FrameAuth(OTHER_KEY, encrypt=True),
}
VERIFIERS: dict[str, wire.FrameAuth] = {  # a receiver of the fleet (none: checks nothing)
    name: wire.FrameAuth(auth.key, auth.checksum, auth.encrypt)
    for name, auth in SEALERS.items()
    if name in ("none", "xxh3", "gmac", "gcm")
}
HOSTILE_SEALERS = ("none", "gmac-other", "gcm-other")  # no frame of theirs verifies here
PREFIX = struct.Struct("<4sHBB16s")
U32 = st.integers(0, 2**32 - 1)
TIDS = st.binary(min_size=16, max_size=16)
TEXT = st.text(st.characters(codec="utf-8"), max_size=32)  # no lone surrogates: sendable
KEYS = st.text(st.characters(codec="utf-8"), max_size=8)
JSON: st.SearchStrategy[Any] = st.recursive(  # no NaN: it would not compare equal to itself
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | KEYS,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(KEYS, kids, max_size=4),
    max_leaves=10,
)
NASTY_NUMBERS = [10**400, -(10**400), 2**64, -1, float("nan"), float("inf"), 1e308, True]
NASTY_BODIES = [
    b"[" * 3000 + b"]" * 3000,  # deeper than the JSON decoder's recursion limit
    b'{"a": ' + b"9" * 4400 + b"}",  # longer than Python's int digit limit
    b'{"a": ' + b"9" * 4000 + b"}",
    '{"a": 1}'.encode("utf-16"),
    b'{"a": NaN, "b": -Infinity}',
    b"\xff\xfe\x00",
    b"[]",
    b"null",
    b"",
]
"""Bodies a strict decoder must refuse cleanly (or accept as data), never crash on."""


class Finding(AssertionError):
    """An input broke a property of the KV channel."""


class Fatal(Finding):
    """A finding after which an endpoint of the rig no longer works (its thread died): the
    target's remaining inputs would tell nothing more."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise Finding(what)


def only_malformed(
    call: Callable[[], Any], what: str
) -> tuple[Any, wire.MalformedFrameError | None]:
    """``call()``'s result, or the MalformedFrameError it raised; any other exception is a
    finding."""
    try:
        return call(), None
    except wire.MalformedFrameError as exc:
        return None, exc
    except Exception as exc:
        raise Finding(f"{what} raised {type(exc).__name__}: {exc}") from exc


def compatible(sealer: str, verifier: str) -> bool:
    """Whether frames sealed by ``sealer`` verify for ``verifier`` (a verifier with no checks
    accepts anything; its tags say nothing)."""
    return sealer == verifier


FLEET = wire.FrameAuth(KEY)
ANSWER_S = 5.0  # a reply the peer owes; far above a loaded machine's latency


class Errors:
    """Counts an endpoint's ``internal_error`` drops: each new one is a finding once."""

    def __init__(self, *stats: TransferStats) -> None:
        self.stats = stats
        self.seen = 0

    @contextmanager
    def watch(self) -> Iterator[None]:
        """Around one input: an internal error while it ran is a finding (unless it made one
        of its own already; either way the next input is not blamed for it)."""
        clean = False
        try:
            yield
            clean = True
        finally:
            now = sum(s.dropped_frames.get("internal_error", 0) for s in self.stats)
            new, self.seen = now - self.seen, now
            if clean:
                expect(not new, f"{new} internal error(s) (an exception in the receiving loop)")


class Rig(Protocol):
    """What judges one target's inputs; built once per run of the target. ``errors``: the
    internal errors of its endpoints (None: it has none)."""

    @property
    def errors(self) -> Errors | None: ...

    def check(self, case: Any) -> str: ...  # the outcome; raises Finding

    def finish(self) -> None: ...  # end-of-run checks (the endpoints still serve)

    def close(self) -> None: ...


class PureRig:
    """A target with no sockets: one function judges each input."""

    def __init__(self, judge: Callable[[Any], str]) -> None:
        self.judge = judge
        self.errors: Errors | None = None

    def check(self, case: Any) -> str:
        return self.judge(case)

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


def recv_header(sock: zmq.Socket[bytes], auth: wire.FrameAuth, what: str) -> wire.Header:
    if not sock.poll(int(ANSWER_S * 1000)):
        raise Finding(f"no {what} in {ANSWER_S:.0f}s")
    return wire.decode(sock.recv_multipart()[-1], auth)
