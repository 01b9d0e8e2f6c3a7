"""kvtransfer.keys: keys derived from the fleet secret by HKDF-SHA256, one per purpose and
protocol version; nonces that never repeat for one sealer."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from core.ticket import KV_PROTOCOL_VERSION
from kvtransfer.keys import SALT, NonceSequence, Purpose, derive_key, info

SECRET = b"0123456789abcdef-fleet-key"


def test_derivation_is_deterministic_and_differs_by_purpose() -> None:
    keys = {purpose: derive_key(SECRET, purpose) for purpose in Purpose}
    assert keys == {purpose: derive_key(SECRET, purpose) for purpose in Purpose}
    assert len(set(keys.values())) == len(Purpose)
    assert all(len(key) == 32 for key in keys.values())
    assert derive_key(SECRET + b"!", Purpose.HEADER_MAC) != keys[Purpose.HEADER_MAC]


def test_versions_derive_different_keys() -> None:
    ours = derive_key(SECRET, Purpose.PAYLOAD_MAC)
    assert derive_key(SECRET, Purpose.PAYLOAD_MAC, KV_PROTOCOL_VERSION + 1) != ours
    assert info(Purpose.PAYLOAD_ENCRYPTION) == (
        f"pdserve kv v{KV_PROTOCOL_VERSION} payload-encryption".encode()
    )


def test_known_answer_against_the_cryptography_library() -> None:
    """RFC 5869 test case 1 through the same HKDF, then our parameters through it."""
    ikm, salt = bytes([0x0B] * 22), bytes(range(13))
    okm = HKDF(hashes.SHA256(), 42, salt=salt, info=bytes(range(0xF0, 0xFA))).derive(ikm)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )
    for purpose in Purpose:
        expected = HKDF(hashes.SHA256(), 32, salt=SALT, info=info(purpose)).derive(SECRET)
        assert derive_key(SECRET, purpose) == expected


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        derive_key(b"short", Purpose.HEADER_MAC)


def test_nonces_never_repeat() -> None:
    a, b = NonceSequence(), NonceSequence()
    first = [a.next() for _ in range(1000)]
    assert len(set(first)) == 1000 and all(len(n) == 12 for n in first)
    assert first[0][:8] == first[-1][:8] and int.from_bytes(first[-1][8:]) == 999
    assert b.next()[:8] != first[0][:8]  # each sealer draws its own random prefix
    a._counter = 0xFFFFFFFF
    last, wrapped = a.next(), a.next()
    assert last[8:] == b"\xff" * 4 and wrapped[8:] == bytes(4) and wrapped[:8] != last[:8]
