"""Frame tags verified as a payload arrives: the incremental check accepts exactly what the
one-shot verification accepts, however the payload is split, and refuses everything else."""

from __future__ import annotations

import itertools
import os

import pytest

from kvtransfer.frame_auth import (
    FLAG_CHECKSUM,
    FLAG_MAC,
    TAG_BYTES,
    FrameAuth,
    MalformedFrameError,
    UnauthenticatedFrameError,
)

KEY = b"0123456789abcdef-fleet-key"
AUTHS = {
    "gmac": FrameAuth(KEY),
    "xxh3": FrameAuth(None),
    "none": FrameAuth(None, checksum=False),
}
PREFIX = b"PDKV-header-prefix"
PAYLOAD = os.urandom(300_001)  # odd size: pieces split mid-block of AES and of XXH3's stripes


def _split(data: bytes, cuts: list[int]) -> list[memoryview]:
    view = memoryview(data)
    edges = [0, *cuts, len(data)]
    return [view[a:b] for a, b in itertools.pairwise(edges)]


def _check(auth: FrameAuth, tag: bytes, pieces: list[memoryview], prefix: bytes = PREFIX) -> None:
    check = auth.check(auth.flags, prefix, tag)
    for piece in pieces:
        check.update(piece)
    check.verify()


SPLITS = {
    "whole": [],
    "odd": [1, 17, 4096, 4097, 262_144, 299_999],
    "with-empty": [0, 0, 150_000, 150_000],
}


@pytest.mark.parametrize("mode", list(AUTHS))
@pytest.mark.parametrize("split", list(SPLITS))
def test_incremental_check_accepts_any_split(mode: str, split: str) -> None:
    auth = AUTHS[mode]
    tag = auth.tag(PREFIX, memoryview(PAYLOAD))
    assert len(tag) == TAG_BYTES
    _check(auth, tag, _split(PAYLOAD, SPLITS[split]))
    # and the one-shot verification agrees
    auth.verify(auth.flags, PREFIX, tag, _split(PAYLOAD, SPLITS[split]))


@pytest.mark.parametrize("mode", ["gmac", "xxh3"])
def test_sealed_in_pieces_verifies_whole(mode: str) -> None:
    auth = AUTHS[mode]
    tag = auth.tag(PREFIX, _split(PAYLOAD, SPLITS["odd"]))
    _check(auth, tag, [memoryview(PAYLOAD)])


@pytest.mark.parametrize("mode", ["gmac", "xxh3"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "reorder", "prefix", "tag"])
def test_incremental_check_refuses_damage(mode: str, damage: str) -> None:
    auth = AUTHS[mode]
    tag = auth.tag(PREFIX, memoryview(PAYLOAD))
    pieces = _split(PAYLOAD, [100_000, 200_000])
    prefix = PREFIX
    if damage == "flip":
        corrupted = bytearray(PAYLOAD)
        corrupted[123_456] ^= 0x01
        pieces = _split(bytes(corrupted), [100_000, 200_000])
    elif damage == "truncate":
        pieces = pieces[:2]
    elif damage == "reorder":
        pieces = [pieces[1], pieces[0], pieces[2]]
    elif damage == "prefix":
        prefix = PREFIX[:-1] + b"!"
    else:
        tag = bytes([tag[0] ^ 0x80]) + tag[1:]
    error = UnauthenticatedFrameError if mode == "gmac" else MalformedFrameError
    with pytest.raises(error):
        _check(auth, tag, pieces, prefix)


def test_frames_without_payload() -> None:
    """Headers alone (DONE, ACK, handshake) verify with no piece fed, in every mode."""
    for auth in AUTHS.values():
        tag = auth.tag(PREFIX, None)
        auth.check(auth.flags, PREFIX, tag).verify()
        auth.verify(auth.flags, PREFIX, tag, None)


def test_header_level_refusals_come_at_verify() -> None:
    """A frame whose flags do not fit the channel is refused only once its payload has been
    taken off the channel (the caller reads it either way)."""
    keyed, summed, plain = AUTHS["gmac"], AUTHS["xxh3"], AUTHS["none"]
    cases = [
        (keyed, summed, UnauthenticatedFrameError, "carries no MAC"),
        (summed, keyed, UnauthenticatedFrameError, "no key"),
        (summed, plain, MalformedFrameError, "carries none"),
    ]
    for receiver, sender, error, message in cases:
        tag = sender.tag(PREFIX, memoryview(PAYLOAD))
        check = receiver.check(sender.flags, PREFIX, tag)
        check.update(memoryview(PAYLOAD))  # does not raise
        with pytest.raises(error, match=message):
            check.verify()
    # a channel without checksums accepts a checksummed frame (nothing to require)
    plain.check(FLAG_CHECKSUM, PREFIX, summed.tag(PREFIX, None)).verify()
    assert keyed.flags == FLAG_MAC


def test_mac_padding_must_be_zero() -> None:
    auth = AUTHS["gmac"]
    tag = bytearray(auth.tag(PREFIX, memoryview(PAYLOAD)))
    tag[-1] = 1
    with pytest.raises(UnauthenticatedFrameError):
        _check(auth, bytes(tag), [memoryview(PAYLOAD)])


# -- encrypted pages (--kv-encrypt) ------------------------------------------------------------

GCM = FrameAuth(KEY, encrypt=True)


def _sealed_copy() -> tuple[bytes, bytearray]:
    """A frame tag and a writable copy of the ciphertext it covers (as it lands in a pool)."""
    tag, sent = GCM.seal(PREFIX, memoryview(PAYLOAD))
    assert isinstance(sent, memoryview) and bytes(sent) != PAYLOAD
    return tag, bytearray(sent)


@pytest.mark.parametrize("split", list(SPLITS))
def test_encrypted_payload_decrypts_in_place_however_split(split: str) -> None:
    tag, landed = _sealed_copy()
    _check(GCM, tag, _split(landed, SPLITS[split]))  # type: ignore[arg-type]
    assert landed == PAYLOAD
    tag, landed = _sealed_copy()
    GCM.verify(GCM.flags, PREFIX, tag, memoryview(landed))
    assert landed == PAYLOAD


def test_sealed_in_pieces_decrypts_whole() -> None:
    tag, sent = GCM.seal(PREFIX, _split(PAYLOAD, SPLITS["odd"]))
    assert isinstance(sent, memoryview)
    landed = bytearray(sent)
    _check(GCM, tag, [memoryview(landed)])
    assert landed == PAYLOAD


@pytest.mark.parametrize("damage", ["flip", "truncate", "prefix", "tag", "padding"])
def test_encrypted_payload_refuses_damage(damage: str) -> None:
    tag, landed = _sealed_copy()
    prefix = PREFIX
    pieces = [memoryview(landed)]
    if damage == "flip":
        landed[123_456] ^= 0x01
    elif damage == "truncate":
        pieces = [memoryview(landed)[:-1]]
    elif damage == "prefix":
        prefix = PREFIX[:-1] + b"!"
    elif damage == "tag":
        tag = tag[:20] + bytes([tag[20] ^ 1]) + tag[21:]
    else:
        tag = tag[:-1] + b"\x01"
    with pytest.raises(UnauthenticatedFrameError):
        _check(GCM, tag, pieces, prefix)


def test_encryption_must_be_on_at_both_ends() -> None:
    keyed = AUTHS["gmac"]
    assert GCM.integrity == "aes-256-gcm" != keyed.integrity
    tag = keyed.tag(PREFIX, memoryview(PAYLOAD))
    check = GCM.check(keyed.flags, PREFIX, tag)
    check.update(memoryview(bytearray(PAYLOAD)))
    with pytest.raises(UnauthenticatedFrameError, match="not encrypted"):
        check.verify()
    tag, landed = _sealed_copy()
    check = keyed.check(GCM.flags, PREFIX, tag)
    check.update(memoryview(landed))
    with pytest.raises(UnauthenticatedFrameError, match="does not decrypt"):
        check.verify()
    for auth in (GCM, keyed):  # headers without a payload: DONE, ACK, handshake
        auth.verify(auth.flags, PREFIX, auth.tag(PREFIX, None), None)
    with pytest.raises(ValueError, match="seal"):
        GCM.tag(PREFIX, memoryview(PAYLOAD))


def test_a_read_only_encrypted_payload_is_refused() -> None:
    tag, landed = _sealed_copy()
    with pytest.raises(MalformedFrameError, match="read-only"):
        _check(GCM, tag, [memoryview(bytes(landed))])
