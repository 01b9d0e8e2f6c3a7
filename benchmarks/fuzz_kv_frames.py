"""The ``frames`` target: valid frames of every kind, sealed every way, mutated (:data:`EDITS`,
:func:`apply_edits`, :func:`reseal`; the attack targets mutate with them too) into
``wire.decode`` (whole and deferred), ``verify_page``, ``payload_check`` and the out-of-band
helpers (:func:`check_frame`): each is decoded or refused with ``MalformedFrameError``, never
anything else, and a frame is accepted exactly when its sealer is the verifier's."""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from benchmarks.fuzz_kv_common import (
    JSON,
    KEYS,
    NASTY_BODIES,
    PREFIX,
    SEALERS,
    TEXT,
    TIDS,
    U32,
    VERIFIERS,
    Finding,
    compatible,
    expect,
    only_malformed,
)
from kvtransfer import wire
from kvtransfer.datapath import Backend
from kvtransfer.handshake import hello_fields
from tests.kvtransfer.harness import (
    fingerprint,
)


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
