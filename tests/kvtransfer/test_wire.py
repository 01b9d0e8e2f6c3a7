"""The KV wire format: every frame kind round-trips under every sealing mode, and every malformed,
corrupted, truncated or forged frame is refused before anything reads its body."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import xxhash
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kvtransfer import wire
from kvtransfer.wire import (
    AbortHeader,
    AckHeader,
    AckStatus,
    DoneHeader,
    FrameAuth,
    FrameKind,
    HandshakeHeader,
    MalformedFrameError,
    PageHeader,
    UnauthenticatedFrameError,
)

TID = bytes(range(16))
KEY = b"0123456789abcdef-fleet-key"
PREFIX = struct.Struct("<4sHBB16s")
PAGE = struct.Struct("<HHIHHHBQ")
AUTHS = {
    "crc": FrameAuth(None),
    "plain": FrameAuth(None, checksum=False),
    "hmac": FrameAuth(KEY),
}
GCM = FrameAuth(KEY, encrypt=True)  # pages go through wire.seal: its own tests
SHAPE = (2, 2, 3, 4, 2, 8)  # layers 2..4, K and V, 3 blocks, block size 4, 2 heads, dim 8


def page_header(dtype: torch.dtype = torch.float16, out_of_band: bool = False) -> PageHeader:
    size = torch.empty((), dtype=dtype).element_size()
    return PageHeader(
        transfer_id=TID,
        layer_start=2,
        layer_end=4,
        block_ids=(7, 3, 11),
        block_size=4,
        num_kv_heads=2,
        head_dim=8,
        dtype=dtype,
        payload_nbytes=torch.Size(SHAPE).numel() * size,
        out_of_band=out_of_band,
    )


def payload_for(header: PageHeader) -> bytearray:
    values = torch.arange(torch.Size(header.shape).numel()).to(header.dtype)
    return bytearray(values.view(torch.uint8).numpy().tobytes())


def seal(prefix: bytes, auth: FrameAuth = AUTHS["crc"], payload: bytes | None = None) -> bytes:
    """A hand-built frame with a valid tag, so that each check is exercised on its own."""
    return prefix + auth.tag(prefix, None if payload is None else memoryview(payload))


def prefix(
    kind: int = FrameKind.PAGE,
    *,
    flags: int = wire.FLAG_CHECKSUM,
    version: int = wire.PROTOCOL_VERSION,
    magic: bytes = wire.MAGIC,
) -> bytes:
    return PREFIX.pack(magic, version, kind, flags, TID)


def page_body(
    *,
    layers: tuple[int, int] = (0, 1),
    num_blocks: int = 2,
    block_ids: tuple[int, ...] = (0, 1),
    dims: tuple[int, int, int] = (4, 2, 8),
    dtype_code: int = 1,
    nbytes: int | None = None,
) -> bytes:
    if nbytes is None:
        nbytes = (layers[1] - layers[0]) * 2 * num_blocks * dims[0] * dims[1] * dims[2] * 4
    body = PAGE.pack(layers[0], layers[1], num_blocks, *dims, dtype_code, nbytes)
    return body + struct.pack(f"<{len(block_ids)}I", *block_ids)


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", list(AUTHS.values()), ids=list(AUTHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_page_round_trip(auth: FrameAuth, dtype: torch.dtype) -> None:
    header = page_header(dtype)
    payload = memoryview(payload_for(header))
    decoded = wire.decode(wire.encode(header, auth, payload), auth, payload)
    assert decoded == header
    assert isinstance(decoded, PageHeader) and decoded.shape == SHAPE
    wire.check_payload_size(decoded, payload)


@pytest.mark.parametrize("auth", list(AUTHS.values()), ids=list(AUTHS))
def test_out_of_band_page_round_trip(auth: FrameAuth) -> None:
    """The header of an out-of-band PAGE decodes alone; its tag is checked with the payload."""
    header = page_header(out_of_band=True)
    payload = memoryview(payload_for(header))
    frame = wire.encode(header, auth, payload)
    assert frame[7] & wire.FLAG_OUT_OF_BAND
    assert wire.decode(frame, auth) == header
    wire.verify_page(frame, auth, payload)


@pytest.mark.parametrize("auth", list(AUTHS.values()), ids=list(AUTHS))
@pytest.mark.parametrize(
    "header",
    [
        DoneHeader(TID, first_token_id=49151, num_layers=30),
        DoneHeader(TID, first_token_id=0, num_layers=1),
        AbortHeader(TID, ""),
        AbortHeader(TID, "prefill worker died"),
        AbortHeader(TID, "ünïcödé ✓"),
        *(AckHeader(TID, status, msg) for status in AckStatus for msg in ("", "unknown ✓")),
        HandshakeHeader(TID, FrameKind.HELLO, {"fingerprint": {"model": "m", "head_dim": 64}}),
        HandshakeHeader(TID, FrameKind.WELCOME, {"rendezvous": {"store_port": 1234}}),
        HandshakeHeader(TID, FrameKind.REFUSE, {"reason": "dtype is 'float16' ✗"}),
        HandshakeHeader(TID, FrameKind.HELLO, {}),
    ],
    ids=repr,
)
def test_control_frame_round_trip(auth: FrameAuth, header: wire.Header) -> None:
    frame = wire.encode(header, auth)
    assert wire.decode(frame, auth) == header
    assert wire.decode(memoryview(frame), auth) == header


def test_frame_layout() -> None:
    """magic | version | kind | flags | transfer id | body | 16-byte tag, little-endian."""
    frame = wire.encode(DoneHeader(TID, 5, 3), AUTHS["crc"])
    magic, version, kind, flags, transfer_id = PREFIX.unpack_from(frame)
    assert (magic, version, kind, flags, transfer_id) == (
        b"PDKV",
        wire.PROTOCOL_VERSION,
        FrameKind.DONE,
        wire.FLAG_CHECKSUM,
        TID,
    )
    assert frame[PREFIX.size : -wire.TAG_BYTES] == struct.pack("<II", 5, 3)
    assert len(frame) == PREFIX.size + 8 + wire.TAG_BYTES


def _hkdf(purpose: str) -> AESGCM:
    """The key for ``purpose`` as RFC 5869 HKDF-SHA256 derives it, spelled out here."""
    info = f"pdserve kv v{wire.PROTOCOL_VERSION} {purpose}".encode()
    hkdf = HKDF(hashes.SHA256(), 32, salt=b"pdserve kv channel key derivation", info=info)
    return AESGCM(hkdf.derive(KEY))


def test_tags() -> None:
    """XXH3-64 of prefix + payload (big-endian digest, zero padded); with a key a nonce and an
    AES-256-GMAC over prefix + GMAC(payload) under keys derived from the fleet key by HKDF;
    encrypted, the nonce and the AES-256-GCM tag of the payload with the prefix as associated
    data, the payload sent as ciphertext; zeros when checksums are off. Flags say which."""
    header = page_header()
    payload = bytes(payload_for(header))
    modes = [
        ("crc", wire.FLAG_CHECKSUM),
        ("plain", 0),
        ("hmac", wire.FLAG_MAC),
        ("gcm", wire.FLAG_MAC | wire.FLAG_ENCRYPTED),
    ]
    for name, flags in modes:
        auth = GCM if name == "gcm" else AUTHS[name]
        assert auth.flags == flags
        frame, sent = wire.seal(header, auth, memoryview(payload))
        assert frame[7] == flags
        body, tag = frame[: -wire.TAG_BYTES], frame[-wire.TAG_BYTES :]
        if name == "crc":
            assert tag == xxhash.xxh3_64_digest(body + payload) + bytes(24)
        elif name == "hmac":
            nonce = tag[:12]
            inner = _hkdf("payload-mac").encrypt(nonce, b"", payload)
            expected = _hkdf("header-mac").encrypt(nonce, b"", body + inner)
            assert tag[12:28] == expected and tag[28:] == bytes(4)
        elif name == "gcm":
            nonce = tag[:12]
            sealed = _hkdf("payload-encryption").encrypt(nonce, payload, body)
            assert isinstance(sent, memoryview) and bytes(sent) == sealed[:-16] != payload
            assert tag[12:28] == sealed[-16:] and tag[28:] == bytes(4)
        else:
            assert tag == bytes(32)
        if name in ("hmac", "gcm"):
            assert sent is not None and (name == "gcm" or bytes(sent) == payload)
            again, _ = wire.seal(header, auth, memoryview(payload))
            # a nonce never repeats for one sealer: its random prefix, and a counter
            assert again[-32:-24] == tag[:8] and again[-24:-20] != tag[8:12]


def test_an_encrypting_channel_round_trips_and_refuses_plain_frames() -> None:
    """Pages decrypt in place as they are verified; a frame sealed by any other mode, or
    by another key, is refused as unauthenticated, and ``encode`` will not send plaintext."""
    gcm = GCM
    header = page_header()
    payload = payload_for(header)
    frame, sent = wire.seal(header, gcm, memoryview(payload))
    assert isinstance(sent, memoryview)
    received = bytearray(sent)
    wire.verify_page(frame, gcm, memoryview(received))
    assert received == payload
    with pytest.raises(ValueError, match="seal"):
        wire.encode(header, gcm, memoryview(payload))
    others = [AUTHS["hmac"], FrameAuth(b"another key, 16+ bytes long", encrypt=True)]
    for other in others:
        forged, forged_payload = wire.seal(header, other, memoryview(payload))
        assert forged_payload is not None
        with pytest.raises(UnauthenticatedFrameError):
            wire.verify_page(forged, gcm, memoryview(bytearray(forged_payload)))
    with pytest.raises(UnauthenticatedFrameError, match="does not decrypt"):
        wire.verify_page(frame, AUTHS["hmac"], memoryview(bytearray(sent)))
    with pytest.raises(ValueError, match="needs the fleet's key"):
        FrameAuth(None, encrypt=True)


def test_long_texts_are_capped() -> None:
    auth = AUTHS["crc"]
    decoded = wire.decode(wire.encode(AbortHeader(TID, "x" * 5000), auth), auth)
    assert isinstance(decoded, AbortHeader) and decoded.reason == "x" * wire.MAX_TEXT_BYTES
    decoded = wire.decode(wire.encode(AckHeader(TID, AckStatus.FAILED, "y" * 5000), auth), auth)
    assert isinstance(decoded, AckHeader) and decoded.message == "y" * wire.MAX_TEXT_BYTES


def test_encoding_refuses_bad_headers() -> None:
    with pytest.raises(ValueError, match="transfer id"):
        wire.encode(DoneHeader(b"short", 1, 1), AUTHS["crc"])
    big = HandshakeHeader(TID, FrameKind.HELLO, {"x": "y" * wire.MAX_TEXT_BYTES})
    with pytest.raises(ValueError, match="too large"):
        wire.encode(big, AUTHS["crc"])
    with pytest.raises(ValueError, match="16 bytes"):
        FrameAuth(b"short key")


# -- malformed frames -------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [0, 1, 4, PREFIX.size, PREFIX.size + wire.TAG_BYTES - 1])
def test_header_cut_short(cut: int) -> None:
    frame = wire.encode(DoneHeader(TID, 1, 1), AUTHS["crc"])
    with pytest.raises(MalformedFrameError, match="too short"):
        wire.decode(frame[:cut], AUTHS["crc"])


@pytest.mark.parametrize("cut", [1, 4, 9])
def test_header_cut_at_the_end_fails_its_tag(cut: int) -> None:
    header = page_header()
    payload = memoryview(payload_for(header))
    frame = wire.encode(header, AUTHS["crc"], payload)
    with pytest.raises(MalformedFrameError):
        wire.decode(frame[:-cut], AUTHS["crc"], payload)


def test_bad_magic() -> None:
    with pytest.raises(MalformedFrameError, match="magic"):
        wire.decode(seal(prefix(magic=b"PDKX") + page_body()), AUTHS["crc"])


@pytest.mark.parametrize("version", [0, 1, 2, 3, 5, 0xFFFF])
def test_wrong_version(version: int) -> None:
    with pytest.raises(MalformedFrameError, match="version"):
        wire.decode(seal(prefix(version=version) + page_body()), AUTHS["crc"])


@pytest.mark.parametrize("kind", [0, 8, 255])
def test_unknown_kind(kind: int) -> None:
    with pytest.raises(MalformedFrameError, match="kind"):
        wire.decode(seal(prefix(kind) + page_body()), AUTHS["crc"])


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (page_body()[: PAGE.size - 1], "shorter"),
        (page_body(num_blocks=3, block_ids=(0, 1, 2))[:-1], "block ids"),
        (page_body(num_blocks=3, block_ids=(0, 1, 2))[:-4], "block ids"),
        (page_body(num_blocks=2, block_ids=(0, 1, 2)), "block ids"),
        (page_body(num_blocks=0, block_ids=(), nbytes=0), "blocks"),
        (page_body(num_blocks=wire.MAX_BLOCKS_PER_PAGE + 1, block_ids=(), nbytes=0), "blocks"),
        (page_body(layers=(3, 3), nbytes=0), "layer range"),
        (page_body(layers=(4, 2), nbytes=64), "layer range"),
        (page_body(dtype_code=0), "dtype"),
        (page_body(dtype_code=4), "dtype"),
        (page_body(dtype_code=255), "dtype"),
        (page_body(dims=(0, 2, 8), nbytes=0), "zero"),
        (page_body(dims=(4, 0, 8), nbytes=0), "zero"),
        (page_body(dims=(4, 2, 0), nbytes=0), "zero"),
        (page_body(nbytes=255), "payload bytes"),
        (page_body(nbytes=257), "payload bytes"),
        (page_body(nbytes=1 << 40), "payload bytes"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_malformed_page_header(body: bytes, match: str) -> None:
    with pytest.raises(MalformedFrameError, match=match):
        wire.decode(seal(prefix() + body), AUTHS["crc"])


@pytest.mark.parametrize(
    ("kind", "body", "match"),
    [
        (FrameKind.DONE, b"\0" * 7, "DONE"),
        (FrameKind.DONE, b"\0" * 9, "DONE"),
        (FrameKind.ACK, b"", "ACK"),
        (FrameKind.ACK, b"\x07", "status"),
        (FrameKind.HELLO, b"{not json", "JSON"),
        (FrameKind.WELCOME, b"\xff\xfe", "JSON"),
        (FrameKind.REFUSE, json.dumps(["a list"]).encode(), "object"),
    ],
)
def test_malformed_control_frame(kind: FrameKind, body: bytes, match: str) -> None:
    with pytest.raises(MalformedFrameError, match=match):
        wire.decode(seal(prefix(kind) + body), AUTHS["crc"])


# -- corruption and forgery -------------------------------------------------------------------


def sealed_page(auth: FrameAuth, out_of_band: bool = False) -> tuple[bytearray, bytearray]:
    header = page_header(out_of_band=out_of_band)
    payload = payload_for(header)
    return bytearray(wire.encode(header, auth, memoryview(payload))), payload


def test_every_flipped_bit_is_caught_by_the_checksum() -> None:
    """Any single flipped bit of an in-band PAGE (header, tag or payload) is refused, except
    the flag bits that say "no checksum" (see the xfail below) and "out of band" (whose header
    is parsed alone and authenticated with its payload later)."""
    auth = AUTHS["crc"]
    frame, payload = sealed_page(auth)
    for index in range(len(frame) + len(payload)):
        for bit in range(8):
            if index == 7 and 1 << bit in (wire.FLAG_CHECKSUM, wire.FLAG_OUT_OF_BAND):
                continue
            f, p = bytearray(frame), bytearray(payload)
            target, at = (f, index) if index < len(f) else (p, index - len(f))
            target[at] ^= 1 << bit
            with pytest.raises(MalformedFrameError):
                wire.decode(bytes(f), auth, memoryview(p))


def test_truncated_payload_fails_the_checksum_and_the_size_check() -> None:
    auth = AUTHS["crc"]
    frame, payload = sealed_page(auth)
    for cut in (1, 2, len(payload) // 2, len(payload)):
        with pytest.raises(MalformedFrameError, match="checksum"):
            wire.decode(bytes(frame), auth, memoryview(payload)[:-cut])
    header = wire.decode(bytes(frame), auth, memoryview(payload))
    assert isinstance(header, PageHeader)
    wire.check_payload_size(header, memoryview(payload))
    for bad in (memoryview(payload)[:-1], memoryview(payload + b"\0"), memoryview(b"")):
        with pytest.raises(MalformedFrameError, match="payload of"):
            wire.check_payload_size(header, bad)


def test_flipped_mac_bit_is_unauthenticated_without_a_key() -> None:
    frame, payload = sealed_page(AUTHS["crc"])
    frame[7] ^= wire.FLAG_MAC
    with pytest.raises(UnauthenticatedFrameError, match="no key"):
        wire.decode(bytes(frame), AUTHS["crc"], memoryview(payload))


def test_checksums_off_accepts_any_tag() -> None:
    """Switched off, integrity is not checked (local development); the size still is."""
    frame, payload = sealed_page(AUTHS["crc"])
    payload[5] ^= 0xFF
    header = wire.decode(bytes(frame), AUTHS["plain"], memoryview(payload))
    assert isinstance(header, PageHeader)
    with pytest.raises(MalformedFrameError, match="payload of"):
        wire.check_payload_size(header, memoryview(payload)[:-2])


def test_checksumming_side_refuses_frames_that_claim_no_checksum() -> None:
    frame, payload = sealed_page(AUTHS["crc"])
    frame[7] &= ~wire.FLAG_CHECKSUM
    payload[3] ^= 0x40
    with pytest.raises(MalformedFrameError):
        wire.decode(bytes(frame), AUTHS["crc"], memoryview(payload))


@pytest.mark.parametrize(
    ("sender", "match"),
    [
        (FrameAuth(b"another key, 16+ bytes long"), "does not verify"),
        (AUTHS["crc"], "no MAC"),
        (AUTHS["plain"], "no MAC"),
    ],
    ids=["wrong-key", "crc-only", "untagged"],
)
@pytest.mark.parametrize("kind", ["page", "done", "hello"])
def test_keyed_side_refuses_forged_frames(sender: FrameAuth, match: str, kind: str) -> None:
    keyed = AUTHS["hmac"]
    if kind == "page":
        frame, payload = sealed_page(sender)
        with pytest.raises(UnauthenticatedFrameError, match=match):
            wire.decode(bytes(frame), keyed, memoryview(payload))
        oob, payload = sealed_page(sender, out_of_band=True)
        wire.decode(bytes(oob), keyed)  # parsed; authenticated with its payload, below
        with pytest.raises(UnauthenticatedFrameError, match=match):
            wire.verify_page(bytes(oob), keyed, memoryview(payload))
        return
    header: wire.Header = (
        DoneHeader(TID, 1, 3)
        if kind == "done"
        else HandshakeHeader(TID, FrameKind.HELLO, {"fingerprint": {}})
    )
    with pytest.raises(UnauthenticatedFrameError, match=match):
        wire.decode(wire.encode(header, sender), keyed)


def test_keyed_tags_cover_header_and_payload() -> None:
    keyed = AUTHS["hmac"]
    frame, payload = sealed_page(keyed)
    wire.decode(bytes(frame), keyed, memoryview(payload))
    for target, index in [(frame, 30), (frame, len(frame) - 1), (payload, 0), (payload, -1)]:
        target[index] ^= 0x01
        with pytest.raises(UnauthenticatedFrameError):
            wire.decode(bytes(frame), keyed, memoryview(payload))
        target[index] ^= 0x01


def test_out_of_band_payload_is_verified_with_its_header() -> None:
    for auth in (AUTHS["crc"], AUTHS["hmac"]):
        frame, payload = sealed_page(auth, out_of_band=True)
        wire.verify_page(bytes(frame), auth, memoryview(payload))
        payload[-1] ^= 0x08
        with pytest.raises(MalformedFrameError):
            wire.verify_page(bytes(frame), auth, memoryview(payload))
        with pytest.raises(MalformedFrameError, match="too short"):
            wire.verify_page(bytes(frame[:20]), auth, memoryview(payload))
