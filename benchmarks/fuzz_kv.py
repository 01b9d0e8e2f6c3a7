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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import socket
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
import zmq
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from core.ticket import IncompatiblePeerError, TransferTicket, check_ticket
from kvtransfer import wire
from kvtransfer.datapath import Backend, StreamLink, join_pair
from kvtransfer.handshake import hello_fields
from kvtransfer.metrics import TransferStats
from kvtransfer.sender import KVSender, TransferSpec
from protos.pdserve.v1 import worker_pb2
from server_runtime.proto_convert import ticket_from_proto, ticket_to_proto
from tests.kvtransfer.harness import (
    GROUP_TIMEOUT_S,
    KEY,
    LAYERS,
    NOBODY,
    NUM_BLOCKS,
    OTHER_KEY,
    Channel,
    Recorder,
    Transport,
    bits,
    fingerprint,
    random_pages,
    same_bits,
    stop_all,
    tid,
)

# ---- what seals and what verifies ---------------------------------------------------------

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


# ---- frames -------------------------------------------------------------------------------


@st.composite
def page_headers(draw: st.DrawFn) -> wire.PageHeader:
    layers, start, n = draw(st.integers(1, 3)), draw(st.integers(0, 4)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(list(wire.DTYPE_CODES)))
    bs, heads, dim = draw(st.integers(1, 4)), draw(st.integers(1, 2)), draw(st.integers(1, 8))
    header = wire.PageHeader(
        transfer_id=draw(TIDS),
        layer_start=start,
        layer_end=start + layers,
        block_ids=tuple(draw(st.lists(U32, min_size=n, max_size=n))),
        block_size=bs,
        num_kv_heads=heads,
        head_dim=dim,
        dtype=dtype,
        payload_nbytes=0,
        out_of_band=draw(st.booleans()),
    )
    return wire.PageHeader(**{**header.__dict__, "payload_nbytes": header.expected_nbytes()})


def handshake_fields() -> st.SearchStrategy[dict[str, Any]]:
    fp = fingerprint(Backend.ZMQ)
    return st.one_of(
        st.just(hello_fields(fp)),
        st.just({"fingerprint": fp.to_fields(), "rendezvous": {"token": "00" * 16}}),
        st.dictionaries(KEYS, JSON, max_size=4),
    )


HEADERS: st.SearchStrategy[wire.Header] = st.one_of(
    page_headers(),
    st.builds(wire.DoneHeader, TIDS, U32, U32),
    st.builds(wire.AbortHeader, TIDS, TEXT),
    st.builds(wire.AckHeader, TIDS, st.sampled_from(wire.AckStatus), TEXT),
    st.builds(
        wire.HandshakeHeader,
        TIDS,
        st.sampled_from([wire.FrameKind.HELLO, wire.FrameKind.WELCOME, wire.FrameKind.REFUSE]),
        handshake_fields(),
    ),
)

# (offset, struct format) of every field a header may have: prefix, then PAGE / DONE / ACK body
FIELDS = [(0, "4s"), (4, "H"), (6, "B"), (7, "B"), (8, "16s")]
FIELDS += [(24 + o, f) for o, f in [(0, "H"), (2, "H"), (4, "I"), (8, "H"), (10, "H")]]
FIELDS += [(24 + o, f) for o, f in [(12, "H"), (14, "B"), (15, "Q"), (0, "I"), (4, "I")]]
FIELDS += [(24, "B")]


@st.composite
def field_values(draw: st.DrawFn) -> tuple[int, bytes]:
    offset, fmt = draw(st.sampled_from(FIELDS))
    if fmt.endswith("s"):
        size = struct.calcsize(fmt)
        return offset, draw(
            st.sampled_from([wire.MAGIC, bytes(size)]) | st.binary(min_size=size, max_size=size)
        )
    bits = 8 * struct.calcsize(fmt)
    value = draw(st.integers(0, 8) | st.integers(0, 2**bits - 1) | st.just(2**bits - 1))
    return offset, struct.pack("<" + fmt, value)


Edit = tuple[str, int, int, bytes]
"""``(op, part, position, data)`` on a message's parts (0: the header frame, 1: the payload):
flip a bit, cut, grow, put bytes at a position, set a header field, replace the body. Only
growing adds a part the message lacks (a payload, to a frame that has none)."""

EDITS: st.SearchStrategy[Edit] = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1), st.integers(0, 2**16), st.just(b"")),
    st.tuples(st.just("cut"), st.integers(0, 1), st.integers(0, 2**12), st.just(b"")),
    st.tuples(st.just("grow"), st.integers(0, 1), st.just(0), st.binary(min_size=1, max_size=40)),
    st.tuples(
        st.just("put"), st.integers(0, 1), st.integers(0, 2**12), st.binary(min_size=1, max_size=8)
    ),
    field_values().map(lambda f: ("field", 0, f[0], f[1])),
    st.tuples(
        st.just("body"),
        st.just(0),
        st.just(0),
        st.sampled_from(NASTY_BODIES)
        | st.binary(max_size=64)
        | JSON.map(lambda v: json.dumps(v).encode()),
    ),
)


def apply_edits(parts: list[bytes], edits: tuple[Edit, ...]) -> list[bytes]:
    """The message's parts with ``edits`` applied (a header's tag is the last TAG_BYTES of
    part 0)."""
    parts = list(parts)
    for op, part, position, data in edits:
        if part >= len(parts):
            if op != "grow":
                continue
            parts.append(b"")
        old = parts[part]
        if op == "flip" and old:
            index = position % len(old)
            new = old[:index] + bytes([old[index] ^ (1 << position % 8)]) + old[index + 1 :]
        elif op == "cut":
            new = old[: position % (len(old) + 1)]
        elif op == "grow":
            new = old + data
        elif op == "put" and old:
            index = position % len(old)
            new = (old[:index] + data + old[index + len(data) :])[
                : max(len(old), index + len(data))
            ]
        elif op == "field" and len(old) >= position + len(data):
            new = old[:position] + data + old[position + len(data) :]
        elif op == "body" and len(old) >= PREFIX.size + wire.TAG_BYTES:
            new = old[: PREFIX.size] + data + old[-wire.TAG_BYTES :]
        else:
            new = old
        parts[part] = new
    return parts


def reseal(parts: list[bytes], auth: wire.FrameAuth) -> list[bytes]:
    """A tag made again over the (edited) header and payload: what a sealer holding ``auth``'s
    key would send for them (an encrypting sealer encrypts the payload as it is)."""
    header = parts[0]
    if len(header) < wire.TAG_BYTES:
        return parts
    prefix = header[: -wire.TAG_BYTES]
    payload = memoryview(parts[1]) if len(parts) > 1 else None
    tag, sent = auth.seal(prefix, payload)
    return [prefix + tag, *([] if sent is None else [_bytes(sent)]), *parts[2:]]


def _bytes(payload: wire.Payload) -> bytes:
    """A sealed payload (one buffer: everything here seals whole payloads) as bytes."""
    assert isinstance(payload, memoryview)
    return bytes(payload)


@dataclass(frozen=True)
class FrameCase:
    sealer: str
    verifier: str
    header: wire.Header
    plain: bytes | None  # the payload before sealing
    sent: tuple[bytes, ...]  # what was sealed: header frame (and payload as sent)
    parts: tuple[bytes, ...]  # what arrives
    resealed: bool
    split_at: int  # where a deferred payload is fed in two pieces

    @property
    def intact(self) -> bool:
        return self.parts == self.sent

    def __repr__(self) -> str:
        shown = [p[:80].hex() + ("..." if len(p) > 80 else "") for p in self.parts]
        return (
            f"FrameCase({type(self.header).__name__}, sealer={self.sealer}, "
            f"verifier={self.verifier}, resealed={self.resealed}, parts={shown})"
        )


@st.composite
def frame_cases(draw: st.DrawFn) -> FrameCase:
    sealer, verifier = draw(st.sampled_from(list(SEALERS))), draw(st.sampled_from(list(VERIFIERS)))
    if draw(st.integers(0, 3)) == 0:
        verifier = sealer if sealer in VERIFIERS else verifier  # intact frames get through too
    header = draw(HEADERS)
    plain = None
    if isinstance(header, wire.PageHeader):
        plain = random.Random(draw(st.integers(0, 2**32))).randbytes(header.payload_nbytes)
    frame, sent = wire.seal(header, SEALERS[sealer], None if plain is None else memoryview(plain))
    sealed = (frame, *([] if sent is None else [_bytes(sent)]))
    if draw(st.integers(0, 9)) == 0:  # arbitrary bytes
        parts = [draw(st.binary(max_size=128)), *draw(st.lists(st.binary(max_size=64), max_size=1))]
    elif draw(st.integers(0, 7)) == 0:  # a body only a strict decoder survives, tag valid
        parts = [sealed[0][: PREFIX.size] + draw(st.sampled_from(NASTY_BODIES)) + bytes(32)]
    else:
        parts = apply_edits(list(sealed), tuple(draw(st.lists(EDITS, max_size=3))))
    resealed = parts != list(sealed) and draw(st.booleans())
    if resealed:
        parts = reseal(parts, SEALERS[sealer])
    return FrameCase(
        sealer, verifier, header, plain, sealed, tuple(parts), resealed, draw(st.integers(0, 2**16))
    )


def _payload(case: FrameCase) -> memoryview | None:
    """A fresh writable copy of the arriving payload (decrypted in place on a GCM channel)."""
    return memoryview(bytearray(case.parts[1])) if len(case.parts) > 1 else None


def _whole(case: FrameCase, auth: wire.FrameAuth) -> tuple[wire.Header, memoryview | None]:
    payload = _payload(case)
    header = wire.decode(case.parts[0], auth, payload)
    if isinstance(header, wire.PageHeader) and header.out_of_band:
        wire.verify_page(case.parts[0], auth, payload)  # its tag is checked with the payload
    return header, payload


def _deferred(case: FrameCase, auth: wire.FrameAuth) -> tuple[wire.Header, memoryview | None]:
    """As a receiver that copies a payload into place: header first, then the payload's tag,
    fed in two pieces."""
    payload = _payload(case)
    header = wire.decode(case.parts[0], auth, payload, defer_page=True)
    if isinstance(header, wire.PageHeader) and payload is not None:
        check = wire.payload_check(case.parts[0], auth)
        cut = case.split_at % (payload.nbytes + 1)
        check.update(payload[:cut])
        check.update(payload[cut:])
        check.verify()
    elif isinstance(header, wire.PageHeader):
        wire.verify_page(case.parts[0], auth, None)
    return header, payload


def check_frame(case: FrameCase) -> str:
    """Decode one frame every way a receiver does; returns the verdict."""
    auth = VERIFIERS[case.verifier]
    frame = case.parts[0]
    only_malformed(lambda: wire.split(frame), "wire.split")
    oob_size = None
    try:
        wire.is_out_of_band_page(frame)
        oob_size = wire.out_of_band_payload_size(frame)
    except Exception as exc:
        raise Finding(f"an out-of-band helper raised {type(exc).__name__}: {exc}") from exc
    whole, refused = only_malformed(lambda: _whole(case, auth), "wire.decode (whole)")
    deferred, refused_deferred = only_malformed(
        lambda: _deferred(case, auth), "wire.decode (deferred)"
    )
    expect(
        (whole is None) == (deferred is None),
        f"the whole and deferred decodings disagree: {refused!r} / {refused_deferred!r}",
    )
    if whole is not None and isinstance(whole[0], wire.PageHeader) and whole[0].out_of_band:
        expect(oob_size == whole[0].payload_nbytes, f"out-of-band size {oob_size} != header's")
    if case.verifier == "none":
        return "accepted" if whole is not None else type(refused).__name__
    authentic = compatible(case.sealer, case.verifier) and (case.intact or case.resealed)
    if whole is not None:
        expect(authentic, f"a frame whose tag does not verify was accepted: {whole[0]!r}")
    if compatible(case.sealer, case.verifier) and case.intact:
        expect(whole is not None, f"an intact frame was refused: {refused!r}")
        assert whole is not None and deferred is not None
        expect(whole[0] == case.header, f"decoded {whole[0]!r}, sent {case.header!r}")
        for _, payload in (whole, deferred):
            if case.plain is not None:
                expect(payload is not None and bytes(payload) == case.plain, "payload altered")
    return "accepted" if whole is not None else type(refused).__name__


# ---- handshakes ---------------------------------------------------------------------------

FLEET = wire.FrameAuth(KEY)
ANSWER_S = 5.0  # a reply the peer owes; far above a loaded machine's latency


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()  # an edit that deletes the field
FP_FIELDS = list(fingerprint(Backend.ZMQ).to_fields())
QUOTES = "'" * 1400 + '"'  # 1.4 KB of JSON, 4.2 KB once repr()'d into a refusal's reason
HOSTILE_VALUES: st.SearchStrategy[Any] = st.sampled_from([*NASTY_NUMBERS, QUOTES]) | JSON


def _set(fields: dict[str, Any], path: str, value: Any) -> None:
    """Set (or, with MISSING, delete) ``fields[a]`` or, for a path ``a.b``, ``fields[a][b]``
    when ``fields[a]`` is an object."""
    head, _, tail = path.partition(".")
    target = fields
    if tail:
        nested = fields.get(head)
        if not isinstance(nested, dict):
            return
        target, head = nested, tail
    if value is MISSING:
        target.pop(head, None)
    else:
        target[head] = value


@dataclass(frozen=True)
class HelloCase:
    edits: tuple[tuple[str, Any], ...]  # (path, value) over the HELLO's fields
    age_s: float  # how long ago it was sent (before the edits)

    @property
    def intact(self) -> bool:
        return not self.edits and abs(self.age_s) < 60

    def fields(self, now: float) -> dict[str, Any]:
        fields = hello_fields(fingerprint(Backend.ZMQ), clock=lambda: now - self.age_s)
        for path, value in self.edits:
            _set(fields, path, value)
        return fields


HELLO_PATHS = st.sampled_from(["fingerprint", "sent_at", *(f"fingerprint.{f}" for f in FP_FIELDS)])
HELLO_CASES = st.builds(
    HelloCase,
    st.lists(st.tuples(HELLO_PATHS, HOSTILE_VALUES | st.just(MISSING)), max_size=2).map(tuple),
    st.floats(-300, 300) | st.just(0.0),
)


def fresh_and_mine(fields: dict[str, Any], now: float) -> bool:
    """What a receiver may welcome: this fleet's fingerprint, sent within two minutes."""
    mine = fingerprint(Backend.ZMQ).to_fields()
    theirs, sent = fields.get("fingerprint"), fields.get("sent_at")
    return (
        isinstance(theirs, dict)
        and all(name in theirs and theirs[name] == value for name, value in mine.items())
        and isinstance(sent, int | float)
        and not isinstance(sent, bool)
        and abs(now - sent) <= 120
    )


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


class HelloRig:
    """A keyed receiver; each input is a HELLO sent from a DEALER, then sent again (a replay):
    the first is welcomed exactly when it is fresh and this fleet's, the replay never is."""

    def __init__(self, scratch: Path) -> None:
        self.ch = Channel(Transport("tcp", Backend.ZMQ, scratch), receiver_auth=FLEET, sender=False)
        self.peer = self.ch.raw_peer()
        self.errors = Errors(self.ch.receiver.stats)

    def check(self, case: HelloCase) -> str:
        now = time.time()
        fields = case.fields(now)
        try:
            frame = wire.encode(
                wire.HandshakeHeader(os.urandom(16), wire.FrameKind.HELLO, fields), FLEET
            )
        except ValueError:
            return "too large to send"
        answers = []
        for _ in range(2):
            self.peer.sock.send(frame)
            answer = recv_header(self.peer.sock, FLEET, "answer to a HELLO")
            expect(isinstance(answer, wire.HandshakeHeader), f"a HELLO answered by {answer!r}")
            assert isinstance(answer, wire.HandshakeHeader)
            answers.append(answer.kind)
        welcomed = answers[0] is wire.FrameKind.WELCOME
        expect(answers[1] is wire.FrameKind.REFUSE, "a replayed HELLO was welcomed")
        expect(
            not welcomed or fresh_and_mine(json.loads(json.dumps(fields)), now),
            "welcomed a HELLO it should refuse",
        )
        expect(welcomed or not case.intact, "refused a fresh HELLO of this fleet")
        return answers[0].name

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self.ch.close()


@dataclass(frozen=True)
class WelcomeCase:
    backend: Backend
    kind: wire.FrameKind  # WELCOME or REFUSE
    edits: tuple[tuple[str, Any], ...]

    @property
    def intact(self) -> bool:
        return self.kind is wire.FrameKind.WELCOME and not self.edits


OFFER_PATHS = ["rendezvous", "rendezvous.token", "rendezvous.stream_host", "rendezvous.stream_port"]
OFFER_VALUES = {
    "rendezvous.token": st.sampled_from(["", "zz" * 16, "ab" * 15, "ab" * 17, 5]),
    "rendezvous.stream_host": st.sampled_from(["::1", "", "bad\x00host", "0.0.0.0", 7]),
    "rendezvous.stream_port": st.sampled_from([-1, 0, 65536, 2**70, "x", 1.5, "CLOSED"]),
    "rendezvous.stream_path": st.sampled_from(["", "\x00", "/", "/nonexistent/kv.sock", "x" * 200]),
}


@st.composite
def welcome_cases(draw: st.DrawFn) -> WelcomeCase:
    backend = draw(st.sampled_from([Backend.ZMQ, Backend.STREAM]))
    kind = draw(st.sampled_from([wire.FrameKind.WELCOME] * 3 + [wire.FrameKind.REFUSE]))
    paths = ["fingerprint", *(f"fingerprint.{f}" for f in FP_FIELDS), "reason"]
    paths += [*OFFER_PATHS, "rendezvous.stream_path"] if backend is Backend.STREAM else []
    edits = []
    for _ in range(draw(st.integers(0, 2))):
        path = draw(st.sampled_from(paths))
        edits.append((path, draw(OFFER_VALUES.get(path, HOSTILE_VALUES) | st.just(MISSING))))
    return WelcomeCase(backend, kind, tuple(edits))


def _drain(listener: socket.socket, records: threading.Event) -> None:
    """Take every connection to ``listener`` and read it to its end (a stream a sender joined);
    ``records`` is set once one carries more than its token's proof (a record)."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_read_to_end, args=(conn, records), daemon=True).start()


def _read_to_end(conn: socket.socket, records: threading.Event) -> None:
    with conn:
        conn.settimeout(30)
        total = 0
        try:
            while chunk := conn.recv(1 << 16):
                total += len(chunk)
                if total > 16:
                    records.set()
        except OSError:
            pass


class WelcomeRig:
    """A hostile decode worker (a ROUTER, a stream listener that reads what it is sent). Each
    input: a fresh real sender opens a transfer to it, its HELLO is answered with the input's
    WELCOME or REFUSE, and its DONE (if it handshook) with an ACK; the sender must report the
    transfer (its thread is alive), succeeding only when the answer was a WELCOME of this
    fleet."""

    def __init__(self, scratch: Path) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.router: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind("tcp://127.0.0.1:0")
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.records = threading.Event()
        threading.Thread(target=_drain, args=(self.listener, self.records), daemon=True).start()
        closed = socket.create_server(("127.0.0.1", 0))
        self.closed_port = closed.getsockname()[1]
        closed.close()
        self.rec = Recorder()
        self.errors: Errors | None = None  # each input's sender is judged by its verdict
        self.count = 0

    def fields(self, case: WelcomeCase) -> dict[str, Any]:
        fields: dict[str, Any] = {"fingerprint": fingerprint(case.backend).to_fields()}
        if case.backend is Backend.STREAM:
            port = self.listener.getsockname()[1]
            fields["rendezvous"] = {
                "stream_host": "127.0.0.1",
                "stream_port": port,
                "token": "ab" * 16,
            }
        if case.kind is wire.FrameKind.REFUSE:
            fields = {"reason": "no"}
        for path, value in case.edits:
            _set(fields, path, self.closed_port if value == "CLOSED" else value)
        return fields

    def hello(self) -> tuple[bytes, wire.Header]:
        """The next HELLO (what earlier senders sent after theirs is skipped)."""
        while self.router.poll(int(ANSWER_S * 1000)):
            identity, frame = self.router.recv_multipart()
            header = wire.decode(frame, FLEET)
            if isinstance(header, wire.HandshakeHeader) and header.kind is wire.FrameKind.HELLO:
                return identity, header
        raise Finding("the sender sent no HELLO")

    def done_sent(self, backend: Backend, rid: str, transfer: bytes) -> bool:
        """Whether the sender sent its DONE (on the ROUTER, or on the stream it joined)
        before it reported the transfer failed."""
        deadline = time.monotonic() + ANSWER_S
        while rid not in self.rec.sent and time.monotonic() < deadline:
            if backend is Backend.STREAM and self.records.wait(0.01):
                return True
            if backend is Backend.ZMQ and self.router.poll(10):
                header = wire.decode(self.router.recv_multipart()[-1], FLEET)
                if isinstance(header, wire.DoneHeader) and header.transfer_id == transfer:
                    return True
        return False

    def check(self, case: WelcomeCase) -> str:
        self.count += 1
        rid, transfer = f"w{self.count}", tid(self.count)
        fp = fingerprint(case.backend)
        sender = KVSender(
            fp, FLEET, ack_timeout_s=ANSWER_S, handshake_timeout_s=2.0, on_sent=self.rec.on_sent
        )
        sender.start()
        try:
            sender.open(TransferSpec(rid, transfer, self.endpoint, (0,)))
            sender.finish(transfer, 7)
            identity, hello = self.hello()
            fields = self.fields(case)
            try:
                reply = wire.encode(
                    wire.HandshakeHeader(hello.transfer_id, case.kind, fields), FLEET
                )
            except ValueError:
                reply = wire.encode(
                    wire.HandshakeHeader(hello.transfer_id, wire.FrameKind.REFUSE, {}), FLEET
                )
            self.records.clear()
            self.router.send_multipart([identity, reply])
            if self.done_sent(case.backend, rid, transfer):  # it handshook: acknowledge
                ack = wire.AckHeader(transfer, wire.AckStatus.OK, "")
                self.router.send_multipart([identity, wire.encode(ack, FLEET)])
            try:
                self.rec.wait(
                    lambda: rid in self.rec.sent, "the sender's verdict", timeout=3 * ANSWER_S
                )
            except AssertionError:
                raise Fatal("the sender never reported the transfer (its thread died?)") from None
            ok, message = self.rec.sent[rid][0]
            theirs = json.loads(json.dumps(fields)).get("fingerprint")
            if ok:
                expect(
                    case.kind is wire.FrameKind.WELCOME and theirs == fp.to_fields(),
                    "handshook with a WELCOME it should refuse",
                )
            expect(ok or not case.intact, f"refused an intact WELCOME: {message}")
            expect(sender.pending() == 0, "the transfer is still open")
            return "sent" if ok else message.split(":")[0]
        finally:
            stop_all([sender])

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self.router.close(linger=0)
        self.listener.close()


# ---- tickets ------------------------------------------------------------------------------

MINE = fingerprint(Backend.ZMQ)
PROMPT_BLOCKS = 3
ENDPOINTS = [
    "tcp://127.0.0.1:5555",
    "tcp://[::1]:5555",
    "ipc:///tmp/kv.sock",
    "inproc://kv",
    "tcp://-:5",
    "tcp://127.0.0.1:99999",
    "ipc:///" + "x" * 120,
    "tcp://127.0.0.1:5555\n",
    " tcp://127.0.0.1:5555",
    "tcp://127.0.0.1",
    "udp://127.0.0.1:5555",
    "",
]
U32_FIELDS = ["block_size", "num_layers", "num_kv_heads", "head_dim", "protocol_version"]
TICKET_EDITS: dict[str, st.SearchStrategy[Any]] = {
    "transfer_id": st.binary(max_size=20),
    "kv_endpoint": st.sampled_from(ENDPOINTS) | TEXT,
    "block_ids": st.lists(U32, max_size=5),
    "lease_seconds": st.floats(width=32),
    "cached_blocks": st.integers(0, 4) | U32,
    **{
        f"fingerprint.{name}": TEXT | st.sampled_from(["xxh3-64", "aes-256-gmac", "float16"])
        for name in ["model", "dtype", "backend", "layout", "integrity"]
    },
    **{f"fingerprint.{name}": st.integers(0, 8) | U32 for name in U32_FIELDS},
}


def issued_ticket(
    transfer_id: bytes, endpoint: str, blocks: tuple[int, ...], cached: int
) -> TransferTicket:
    """A ticket as a decode worker issues it (``DecodeWorker.reserve``)."""
    return TransferTicket(transfer_id, endpoint, blocks, 30.0, MINE, cached)


@dataclass(frozen=True)
class TicketCase:
    original: bytes  # the issued ticket, serialized
    data: bytes  # what the prefill worker parses

    def __repr__(self) -> str:
        return f"TicketCase(original={self.original.hex()}, data={self.data.hex()})"


def mutate_ticket(draw: st.DrawFn, message: worker_pb2.TransferTicket, paths: list[str]) -> None:
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(paths))
        value = draw(TICKET_EDITS[path])
        target: Any = message
        name = path
        if path.startswith("fingerprint."):
            target, name = message.fingerprint, path.split(".", 1)[1]
        if name == "block_ids":
            del message.block_ids[:]
            message.block_ids.extend(value)
        else:
            setattr(target, name, value)


@st.composite
def ticket_cases(draw: st.DrawFn) -> TicketCase:
    blocks = tuple(
        draw(
            st.lists(
                st.integers(0, 63), min_size=PROMPT_BLOCKS, max_size=PROMPT_BLOCKS, unique=True
            )
        )
    )
    real = issued_ticket(draw(TIDS), ENDPOINTS[0], blocks, draw(st.integers(0, PROMPT_BLOCKS - 1)))
    message = ticket_to_proto(real)
    mutate_ticket(draw, message, list(TICKET_EDITS))
    data = message.SerializeToString()
    if draw(st.booleans()):
        data = apply_edits(
            [data],
            tuple(
                draw(st.lists(EDITS.filter(lambda e: e[0] not in ("field", "body")), max_size=3))
            ),
        )[0]
    return TicketCase(ticket_to_proto(real).SerializeToString(), data)


def parse_ticket(data: bytes) -> tuple[TransferTicket | None, str]:
    """As a prefill worker takes a ticket: protobuf, the servicer's transfer id check
    (``prefill_service.servicer``), ``check_ticket``. Only their documented refusals may come
    out; returns the ticket (None when refused) and the verdict."""
    try:
        message = worker_pb2.TransferTicket.FromString(data)
    except DecodeError:
        return None, "undecodable"
    if len(message.transfer_id) != 16:
        return None, "bad transfer id"
    ticket = ticket_from_proto(message)
    try:
        check_ticket(ticket, MINE, PROMPT_BLOCKS)
    except IncompatiblePeerError:
        return None, "refused"
    expect(ticket.fingerprint == MINE, f"accepted a ticket of another fleet: {ticket}")
    expect(len(ticket.block_ids) == PROMPT_BLOCKS, f"accepted {len(ticket.block_ids)} blocks")
    expect(0 <= ticket.cached_blocks < PROMPT_BLOCKS, f"accepted cached={ticket.cached_blocks}")
    expect(
        ticket.kv_endpoint.split("://")[0] in ("tcp", "ipc", "inproc"),
        f"accepted {ticket.kv_endpoint!r}",
    )
    expect(not any(c.isspace() for c in ticket.kv_endpoint), f"accepted {ticket.kv_endpoint!r}")
    if ticket.kv_endpoint.startswith("tcp://"):
        host, _, port = ticket.kv_endpoint[len("tcp://") :].rpartition(":")
        expect(1 <= int(port) <= 65535, f"accepted port {port}")
        expect(host.strip("[]-.") == host.strip("[]"), f"accepted host {host!r}")
    return ticket, "accepted"


def check_ticket_case(case: TicketCase) -> str:
    try:
        ticket, verdict = parse_ticket(case.data)
    except Finding:
        raise
    except Exception as exc:
        raise Finding(f"parsing a ticket raised {type(exc).__name__}: {exc}") from exc
    expect(
        ticket is not None or case.data != case.original, f"refused the issued ticket: {verdict}"
    )
    return verdict


@dataclass(frozen=True)
class TicketUse:
    """How a ticket the decode worker issued is altered before a prefill worker uses it."""

    cached: int  # the issued ticket's cached prefix blocks (not reserved for writing)
    transfer_id: int  # 0: as issued, else another id
    blocks: tuple[int, ...] | None  # another block list (None: as issued)
    cached_claimed: int | None  # another cached_blocks (None: as issued)
    endpoint: str | None  # another endpoint, which check_ticket refuses (None: as issued)


TICKET_USES = st.builds(
    TicketUse,
    st.integers(0, PROMPT_BLOCKS - 1),
    st.sampled_from([0, 0, 0, 1]),
    st.none()
    | st.lists(
        st.integers(0, 17) | st.just(2**32 - 1), min_size=PROMPT_BLOCKS, max_size=PROMPT_BLOCKS
    ).map(tuple),
    st.none() | st.integers(0, PROMPT_BLOCKS - 1),
    st.sampled_from([None] * 8 + ["tcp://-:5", "ipc:///" + "x" * 120, "tcp://127.0.0.1:99999"]),
)


class TicketTransferRig:
    """A keyed receiver (the decode worker's) and a real sender (a prefill worker's). Each
    input: a reservation, the ticket issued for it, altered, parsed as a prefill worker does
    and, when it passes, used as one does. Pages land only inside the reservation (never in
    its cached prefix); a transfer completes only with every reserved block written."""

    def __init__(self, scratch: Path) -> None:
        self.ch = Channel(
            Transport("tcp", Backend.ZMQ, scratch),
            receiver_auth=FLEET,
            ack_timeout_s=2 * ANSWER_S,
            handshake_timeout_s=1.0,
        )
        self.errors = Errors(self.ch.receiver.stats)
        self.count = 0

    def check(self, use: TicketUse) -> str:
        ch, sender = self.ch, self.ch.sender
        assert sender is not None
        self.count += 1
        rid, transfer = f"t{self.count}", tid(self.count)
        blocks = tuple((3 * self.count + i) % NUM_BLOCKS for i in range(PROMPT_BLOCKS))
        reserved = blocks[use.cached :]
        issued = issued_ticket(transfer, ch.endpoint, blocks, use.cached)
        ticket = dataclasses.replace(
            issued,
            transfer_id=tid(10**6 + self.count) if use.transfer_id else transfer,
            block_ids=use.blocks or blocks,
            cached_blocks=use.cached if use.cached_claimed is None else use.cached_claimed,
            kv_endpoint=use.endpoint or ch.endpoint,
        )
        ch.receiver.expect(transfer, rid, list(reserved), 60.0)
        before = ch.dst.kv.clone()
        try:
            taken, verdict = parse_ticket(ticket_to_proto(ticket).SerializeToString())
            expect(taken is not None or ticket != issued, f"refused the issued ticket: {verdict}")
            if taken is None:
                return verdict
            to_send = taken.blocks_to_send
            pages = random_pages(ch.receiver_fp, len(to_send), seed=self.count)
            sender.open(TransferSpec(rid, taken.transfer_id, taken.kv_endpoint, to_send))
            for layer in range(LAYERS):
                sender.send_pages(taken.transfer_id, layer, pages[layer : layer + 1])
            sender.finish(taken.transfer_id, 7)
            try:
                ok, message = ch.rec.wait_sent(rid)
            except AssertionError:
                raise Fatal("the sender never reported the transfer") from None
            if ok:  # the receiver acks, then reports
                ch.rec.wait(lambda: rid in ch.rec.ready or rid in ch.rec.failed, "a verdict")
            completed = rid in ch.rec.ready
            expect(ok == completed, f"sender says {ok} ({message}), receiver {completed}")
            if completed:
                expect(
                    taken == issued or set(to_send) == set(reserved), f"completed with {to_send}"
                )
                last = {block: i for i, block in enumerate(to_send)}  # a repeated id: the last page
                for block, i in last.items():
                    expect(
                        same_bits(ch.dst.kv[:, :, block], pages[:, :, i]),
                        f"block {block} holds other bytes",
                    )
            else:
                expect(taken != issued, f"the issued ticket's transfer failed: {message}")
            outside = [b for b in range(NUM_BLOCKS) if b not in reserved]
            expect(
                same_bits(ch.dst.kv[:, :, outside], before[:, :, outside]),
                "a block outside the reservation changed",
            )
            expect(sender.pending() == 0, "the sender still holds the transfer")
            return "completed" if completed else message.split(":")[0]
        finally:
            ch.receiver.cancel(transfer)  # what the decode worker does once the prefill failed

    def finish(self) -> None:
        expect(self.ch.receiver.pending() == 0, "reservations left")

    def close(self) -> None:
        self.ch.close()


# ---- a receiver under attack: tampered, replayed and rogue frames --------------------------


class Relay:
    """A man in the middle on a ZeroMQ control channel: senders connect to its ROUTER, it talks
    to the receiver over one DEALER. Each sender message goes through ``on_message`` (the
    messages to forward instead: none, it, altered copies), each reply through ``on_reply``,
    back to the sender that last spoke. Without hooks it is a plain relay (which keeps the
    senders' connections up when the receiver behind it restarts)."""

    def __init__(self, upstream: str) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.front: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        self.back: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
        for sock in (self.front, self.back):
            sock.setsockopt(zmq.LINGER, 0)
        self.front.bind("tcp://127.0.0.1:0")
        self.back.connect(upstream)
        self.endpoint = self.front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.on_message: Callable[[list[bytes]], list[list[bytes]]] = lambda m: [m]
        self.on_reply: Callable[[bytes], list[bytes]] = lambda r: [r]
        self.error: BaseException | None = None  # a hook that raised (the message went as it was)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kv-relay", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        sender: bytes | None = None
        while not self._stop.is_set():
            for sock, _ in poller.poll(20):
                if sock is self.front:
                    sender, *message = self.front.recv_multipart()
                    for out in self._hook(self.on_message, message, [message]):
                        self.back.send_multipart(out)
                elif sender is not None:
                    reply = self.back.recv_multipart()[-1]
                    for out in self._hook(self.on_reply, reply, [reply]):
                        self.front.send_multipart([sender, out])
                else:
                    self.back.recv_multipart()
        self.front.close(linger=0)
        self.back.close(linger=0)

    def _hook(self, hook: Callable[[Any], list[Any]], item: Any, fallback: list[Any]) -> list[Any]:
        try:
            return [out for out in hook(item) if out]
        except Exception as exc:
            self.error = exc
            return fallback

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


MODES = (
    "replace",
    "before",
    "after",
    "drop",
)  # the victim: instead of / before / after its copy, or lost


@dataclass(frozen=True)
class Rogue:
    """A message a stranger sends while the transfer runs: ``what`` is ``garbage`` (``data``
    as it is), a PAGE / DONE / ABORT naming the live transfer sealed by a ``sealer`` that is
    not this fleet's, ``hello`` (the sender's HELLO, replayed), ``tcp`` (``data`` on a raw TCP
    connection to the receiver's port), ``stream`` (``data`` to its stream listener) or
    ``live`` (a message captured from the live transfer, replayed: ``--replay-live`` only)."""

    what: str
    sealer: str = "none"
    data: bytes = b""


@dataclass(frozen=True)
class Attack:
    victim: int  # which message of the transfer: a page per layer, then DONE
    mode: str
    replay: int | None  # the victim's copy starts as an earlier captured message (None: itself)
    edits: tuple[Edit, ...]
    reshape: str  # "" | "header only" | "extra frame" | "merged" (the copy's ZeroMQ frames)
    reseal: (
        bool  # the copy sealed again with the fleet's key: a buggy fleet member, not an attacker
    )
    rogues: tuple[Rogue, ...]
    replies: tuple[bytes, ...]  # hostile replies to the sender, before the transfer's own
    break_stream: bytes | None  # stream backend: written raw into the stream, which then closes


def nasty_reply(auth: wire.FrameAuth, body: bytes) -> bytes:
    """A WELCOME (to no HELLO) with ``body`` as its fields, sealed by ``auth``."""
    kind = wire.FrameKind.WELCOME
    prefix = PREFIX.pack(wire.MAGIC, wire.PROTOCOL_VERSION, kind, auth.flags, bytes(16))
    return reseal([prefix + body + bytes(wire.TAG_BYTES)], auth)[0]


def hostile_replies(auth_name: str) -> st.SearchStrategy[bytes]:
    """Replies no sender may act on: garbage, frames of other fleets, and (on an unkeyed channel,
    where anyone can seal) handshake answers to no HELLO with nasty bodies, acks of no transfer."""
    auth = VERIFIERS[auth_name]
    forged = st.builds(
        lambda name, h: wire.encode(h, SEALERS[name]), st.sampled_from(HOSTILE_SEALERS), HEADERS
    )
    options = [st.binary(max_size=64), forged]
    if auth.key is None:
        nasty = st.sampled_from(NASTY_BODIES).map(lambda body: nasty_reply(auth, body))
        nobody = st.just(
            wire.encode(
                wire.AckHeader(b"\xff" * 16, wire.AckStatus.FAILED, wire.HANDSHAKE_REQUIRED), auth
            )
        )
        options += [nasty, nobody]
    return st.one_of(options)


@st.composite
def attacks(
    draw: st.DrawFn, auth_name: str, stream: bool = False, replay_live: bool = False
) -> Attack:
    victim = draw(st.integers(0, LAYERS))
    modes = MODES if victim < LAYERS else ("before", "after")  # a lost DONE costs an ack timeout
    rogue_kinds = [
        "garbage",
        "forged",
        "hello",
        "tcp",
        *(["stream"] if stream else []),
        *(["live"] if replay_live else []),
    ]
    rogues = draw(
        st.lists(
            st.builds(
                Rogue,
                st.sampled_from(rogue_kinds),
                st.sampled_from(HOSTILE_SEALERS),
                st.binary(max_size=48),
            ),
            max_size=2,
        )
    )
    return Attack(
        victim=victim,
        mode=draw(st.sampled_from(modes)),
        replay=draw(st.none() | st.integers(0, 63)) if draw(st.integers(0, 3)) == 0 else None,
        edits=tuple(draw(st.lists(EDITS, max_size=2))),
        reshape=""
        if stream
        else draw(st.sampled_from(["", "", "", "header only", "extra frame", "merged"])),
        reseal=not VERIFIERS[auth_name].encrypt and draw(st.integers(0, 4)) == 0,
        rogues=tuple(rogues),
        replies=tuple(draw(st.lists(hostile_replies(auth_name), max_size=2))) if not stream else (),
        break_stream=draw(st.none() | st.binary(max_size=40))
        if stream and draw(st.integers(0, 5)) == 0
        else None,
    )


def recv_ack(sock: zmq.Socket[bytes], auth: wire.FrameAuth, transfer: bytes) -> wire.AckHeader:
    """The next ack of ``transfer`` on ``sock`` (other replies are skipped)."""
    deadline = time.monotonic() + 3 * ANSWER_S
    while time.monotonic() < deadline:
        if not sock.poll(100):
            continue
        try:
            reply = wire.decode(sock.recv(), auth)
        except wire.MalformedFrameError:
            continue
        if isinstance(reply, wire.AckHeader) and reply.transfer_id == transfer:
            return reply
    raise Finding(f"no ack of transfer {transfer.hex()}")


def page_message(
    transfer: bytes, pages: Any, blocks: list[int], auth: wire.FrameAuth, out_of_band: bool
) -> list[bytes]:
    """A PAGE as a correct sender builds it (``RawPeer.page``): its frame and payload as sent."""
    payload = bits(pages).numpy().tobytes()
    _, _, _, block_size, kv_heads, head_dim = pages.shape
    header = wire.PageHeader(
        transfer_id=transfer,
        layer_start=0,
        layer_end=pages.shape[0],
        block_ids=tuple(blocks),
        block_size=block_size,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=pages.dtype,
        payload_nbytes=len(payload),
        out_of_band=out_of_band,
    )
    frame, sent = wire.seal(header, auth, memoryview(payload))
    assert isinstance(sent, memoryview)
    return [frame, bytes(sent)]


def alter(
    message: list[bytes], attack: Attack, captured: list[list[bytes]], auth: wire.FrameAuth
) -> list[bytes]:
    """The victim's copy as the attack makes it."""
    base = message
    if attack.replay is not None and len(captured) > 1:
        base = captured[attack.replay % (len(captured) - 1)]  # an earlier one
    parts = apply_edits(list(base), attack.edits)
    if attack.reshape == "header only":
        parts = parts[:1]
    elif attack.reshape == "extra frame":
        parts = [*parts, bytes(8)]
    elif attack.reshape == "merged":
        parts = [b"".join(parts)]
    return reseal(parts, auth) if attack.reseal else parts


def arrange(message: list[bytes], copy: list[bytes], mode: str) -> list[list[bytes]]:
    return {"replace": [copy], "before": [copy, message], "after": [message, copy], "drop": []}[
        mode
    ]


class AttackRig:
    """A receiver under attack (the shared part of the zmq and stream rigs): a stranger's
    DEALER, rogue connections, and the verdict on one transfer under attack."""

    def __init__(self, transport: Transport, auth_name: str, **channel: Any) -> None:
        self.auth = VERIFIERS[auth_name]
        self.ch = Channel(transport, receiver_auth=self.auth, **channel)
        self.stranger = self.ch.raw_peer()  # never handshakes (its replayed HELLO is refused)
        self.captured: list[list[bytes]] = []  # every message of the genuine sender, in order
        self.hello = b""  # the genuine sender's HELLO, once sent
        self.stream_address: dict[str, Any] = {}
        self.live: bytes | None = None
        self.errors = Errors(self.ch.receiver.stats)
        self.count = 0
        self.stranger_is_peer = False  # welcomed: it replayed a HELLO on an unkeyed channel

    def capture(self, message: list[bytes]) -> None:
        self.captured.append(message)
        del self.captured[:-64]

    def rogue(self, rogue: Rogue, transfer: bytes, blocks: list[int], pages: Any) -> None:
        sealer = SEALERS[rogue.sealer]
        if rogue.what == "garbage":
            self.stranger.sock.send(rogue.data)
        elif rogue.what == "forged":
            headers: list[wire.Header] = [
                wire.DoneHeader(transfer, 7, LAYERS),
                wire.AbortHeader(transfer, "forged"),
            ]
            out_of_band = Backend(self.ch.receiver_fp.backend).out_of_band
            messages = [page_message(transfer, pages[:1], blocks, sealer, out_of_band)]
            messages += [[wire.encode(header, sealer)] for header in headers]
            self.stranger.sock.send_multipart(messages[len(rogue.data) % 3])
        elif rogue.what == "hello":
            self.stranger.sock.send(self.hello)
            self.stranger_is_peer |= self.auth.key is None  # no key: nothing tells it apart
        elif rogue.what == "live":
            deadline = time.monotonic() + ANSWER_S
            while (
                not any(m[0][8:24] == transfer for m in self.captured)
                and time.monotonic() < deadline
            ):
                time.sleep(0.002)
            live = [m for m in self.captured if m[0][8:24] == transfer]
            self.stranger.sock.send_multipart(live[len(rogue.data) % len(live)] if live else [b"x"])
        else:  # raw bytes on a TCP connection to the control port or the stream listener
            if rogue.what == "tcp":
                host, port = self.ch.endpoint[len("tcp://") :].rsplit(":", 1)
                address: tuple[str, int] = (host, int(port))
            else:
                address = (self.stream_address["stream_host"], self.stream_address["stream_port"])
            with socket.create_connection(address, timeout=ANSWER_S) as conn:
                conn.sendall(rogue.data)

    def sync(self) -> None:
        """Once the receiver has handled all the stranger sent."""
        self.stranger.sock.send(wire.encode(wire.DoneHeader(NOBODY, 7, LAYERS), self.auth))
        recv_ack(self.stranger.sock, self.auth, NOBODY)

    def judge(
        self, attack: Attack, rid: str, blocks: list[int], pages: Any, before: Any, harmless: bool
    ) -> str:
        rec, receiver = self.ch.rec, self.ch.receiver
        try:
            rec.wait(lambda: rid in rec.ready or rid in rec.failed, "a verdict", timeout=ANSWER_S)
        except AssertionError:
            raise Finding("the reservation got no verdict") from None
        completed = rid in rec.ready
        expect(
            len(rec.ready.get(rid, [])) + len(rec.failed.get(rid, [])) == 1,
            f"two verdicts for {rid}",
        )
        expect(receiver.pending() == 0, f"{receiver.pending()} reservations left pending")
        outside = [b for b in range(NUM_BLOCKS) if b not in blocks]
        expect(
            same_bits(self.ch.dst.kv[:, :, outside], before[:, :, outside]),
            "a block outside the reservation changed",
        )
        # a buggy fleet member may write anything (but nowhere else); so may a stranger that
        # is a peer (see ``stranger_is_peer``) replaying the live transfer's frames
        replaying_peer = self.stranger_is_peer and any(r.what == "live" for r in attack.rogues)
        strict = not attack.reseal and not replaying_peer
        if strict and harmless:
            expect(
                completed,
                f"an attack it should shrug off failed the transfer: {rec.failed.get(rid)}",
            )
            expect(same_bits(self.ch.dst.kv[:, :, blocks], pages), "completed with other bytes")
        elif strict:
            expect(not completed, "completed without one of its genuine messages")
        return (
            "completed"
            if completed
            else rec.failed[rid][0].removeprefix("KV transfer failed: ").split(":")[0]
        )

    def finish(self) -> None:
        """The receiver still serves: a genuine transfer from a new sender completes."""
        count = self.count + 1
        blocks = [(2 * count + i) % NUM_BLOCKS for i in range(2)]
        pages = random_pages(self.ch.receiver_fp, 2, seed=count)
        self.ch.receiver.expect(tid(count), "last", blocks, 60.0)
        sender = self.ch.sender or self.ch.start_sender()
        sender.open(TransferSpec("last", tid(count), self.ch.endpoint, tuple(blocks)))
        self.ch.push(tid(count), pages)
        sender.finish(tid(count), 7)
        try:
            expect(self.ch.rec.wait_sent("last") == (True, ""), "the last genuine transfer failed")
        except AssertionError as exc:
            raise Fatal(f"the receiver stopped serving: {exc}") from None
        expect(same_bits(self.ch.dst.kv[:, :, blocks], pages), "the last transfer's pages differ")
        expect(self.ch.receiver.pending() == 0, "reservations left pending")

    def close(self) -> None:
        self.ch.close()

    def next_transfer(self) -> tuple[str, bytes, list[int], Any, Any]:
        self.count += 1
        blocks = [(2 * self.count + i) % NUM_BLOCKS for i in range(2)]
        return (
            f"x{self.count}",
            tid(self.count),
            blocks,
            random_pages(self.ch.receiver_fp, 2, seed=self.count),
            self.ch.dst.kv.clone(),
        )


class ZmqRig(AttackRig):
    """A real sender and receiver (zmq backend) with a :class:`Relay` between them that
    tampers with one message of each transfer and sends the sender hostile replies."""

    def __init__(self, auth_name: str, scratch: Path) -> None:
        super().__init__(
            Transport("tcp", Backend.ZMQ, scratch),
            auth_name,
            ack_timeout_s=3 * ANSWER_S,
            handshake_timeout_s=ANSWER_S,
        )
        self.relay = Relay(self.ch.endpoint)
        self.relay.on_message = self._on_message
        self.relay.on_reply = self._on_reply
        self.attack: Attack | None = None
        self.harmless = True
        self.index = 0
        self.replies: list[bytes] = []
        self.check(Attack(LAYERS + 1, "replace", None, (), "", False, (), (), None))  # handshake
        self.hello = self.captured[0][0]

    def _on_message(self, message: list[bytes]) -> list[list[bytes]]:
        attack, live = self.attack, self.live
        self.capture(message)
        if attack is None or live is None or message[0][8:24] != live:
            return [message]
        self.index += 1
        if self.index - 1 != attack.victim:
            return [message]
        copy = alter(message, attack, self.captured, self.auth)
        self.harmless = attack.mode in ("before", "after") or (
            attack.mode == "replace" and copy == message
        )
        return arrange(message, copy, attack.mode)

    def _on_reply(self, reply: bytes) -> list[bytes]:
        replies, self.replies = self.replies, []
        return [*replies, reply]

    def check(self, attack: Attack) -> str:
        rid, transfer, blocks, pages, before = self.next_transfer()
        sender = self.ch.sender
        assert sender is not None
        self.ch.receiver.expect(transfer, rid, blocks, 60.0)
        self.harmless, self.index, self.replies = True, 0, list(attack.replies)
        self.attack, self.live = attack, transfer
        try:
            sender.open(TransferSpec(rid, transfer, self.relay.endpoint, tuple(blocks)))
            self.ch.push(transfer, pages)
            sender.finish(transfer, 7)
            for rogue in attack.rogues:
                self.rogue(rogue, transfer, blocks, pages)
            try:
                ok, message = self.ch.rec.wait_sent(rid)
            except AssertionError:
                raise Fatal("the sender never reported the transfer (its thread died?)") from None
            self.sync()
            verdict = self.judge(attack, rid, blocks, pages, before, self.harmless)
            expect(
                ok == (verdict == "completed"),
                f"the sender says {ok} ({message}), the receiver {verdict}",
            )
            expect(sender.pending() == 0, "the sender still holds the transfer")
            expect(self.relay.error is None, f"the relay's hook raised {self.relay.error!r}")
            return verdict
        finally:
            self.attack = self.live = None
            self.ch.receiver.cancel(transfer)

    def close(self) -> None:
        self.relay.close()
        super().close()


class StreamRig(AttackRig):
    """A receiver of the stream backend and a handshaken peer (a real stream link, the fleet's
    key) whose stream carries each transfer's records with one of them tampered with, or
    unreadable bytes that break the link (the peer then handshakes again and resends)."""

    def __init__(self, auth_name: str, scratch: Path) -> None:
        super().__init__(Transport("stream", Backend.STREAM, scratch), auth_name, sender=False)
        self.peer = self.ch.raw_peer()
        self.hello = self.handshake()

    def handshake(self) -> bytes:
        """RawPeer.handshake, keeping the HELLO (for the stranger to replay)."""
        peer = self.peer
        frame = peer.hello_frame()
        peer.sock.send(frame)
        reply = recv_header(peer.sock, self.auth, "WELCOME")
        expect(
            isinstance(reply, wire.HandshakeHeader) and reply.kind is wire.FrameKind.WELCOME,
            f"not welcomed: {reply}",
        )
        assert isinstance(reply, wire.HandshakeHeader)
        if peer.link is not None:
            peer.link.close()
        self.stream_address = reply.fields["rendezvous"]
        peer.link = join_pair(
            Backend.STREAM, self.stream_address, GROUP_TIMEOUT_S, self.auth.stream_proof
        )
        return frame

    def send(self, message: list[bytes]) -> None:
        assert isinstance(self.peer.link, StreamLink)
        payload = b"".join(message[1:])
        self.peer.link.send_record(message[0], memoryview(payload) if payload else None)

    def check(self, attack: Attack) -> str:
        rid, transfer, blocks, pages, before = self.next_transfer()
        self.ch.receiver.expect(transfer, rid, blocks, 60.0)
        self.live = transfer
        messages = [
            list(self.peer.page(transfer, pages[layer : layer + 1], blocks, layer))
            for layer in range(LAYERS)
        ]
        messages.append([wire.encode(wire.DoneHeader(transfer, 7, LAYERS), self.auth)])
        harmless = True
        try:
            if attack.break_stream is not None:
                for message in messages[: attack.victim]:
                    self.send(message)
                assert isinstance(self.peer.link, StreamLink)
                self.peer.link.sock.sendall(attack.break_stream)
                self.peer.link.close()  # the receiver reads to the end, breaks the link
                self.handshake()  # and a new one carries the whole transfer again
                for message in messages:
                    self.capture(message)  # what a stranger may replay (rogue "live")
                    self.send(message)
            else:
                for index, message in enumerate(messages):
                    self.capture(message)
                    if index != attack.victim:
                        self.send(message)
                        continue
                    copy = alter(message, attack, self.captured, self.auth)
                    harmless = attack.mode in ("before", "after") or (
                        attack.mode == "replace" and copy == message
                    )
                    for out in arrange(message, copy, attack.mode):
                        self.send(out)
            for rogue in attack.rogues:
                self.rogue(rogue, transfer, blocks, pages)
            recv_ack(self.peer.sock, self.auth, transfer)
            self.sync()
            self.peer.done(NOBODY)
            recv_ack(self.peer.sock, self.auth, NOBODY)
            return self.judge(attack, rid, blocks, pages, before, harmless)
        finally:
            self.live = None
            self.ch.receiver.cancel(transfer)


# ---- the run ------------------------------------------------------------------------------


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
