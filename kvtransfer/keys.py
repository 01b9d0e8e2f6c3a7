"""The KV channel's keys and nonces: one key per purpose, derived from the fleet's secret with
HKDF-SHA256 (RFC 5869), and 96-bit nonces that never repeat for one sealer.

Every key is ``HKDF-SHA256(secret, salt=SALT, info="pdserve kv v<protocol> <purpose>")``, 32
bytes: the purposes (:class:`Purpose`) never share a key, and peers of different protocol
versions derive different keys, so they cannot verify each other's frames even before the
handshake refuses them. The secret is the ``--kv-key-file`` contents (at least 16 bytes; a
long random string is what HKDF expects, a passphrase is not stretched).

A :class:`NonceSequence` hands out ``prefix (8 random bytes) || counter (u32, big-endian)``:
each sealer (one per worker process and direction) draws its own prefix, so two sealers under
one key collide only if their random prefixes do (about 2^-64 per pair), and one sealer draws a
fresh prefix before its counter would wrap.
"""

from __future__ import annotations

import enum
import os
import struct
import threading

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from core.ticket import KV_PROTOCOL_VERSION

SALT = b"pdserve kv channel key derivation"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12
_PREFIX_BYTES = 8
_COUNTER = struct.Struct(">I")


class Purpose(enum.Enum):
    """What a derived key is for (its HKDF ``info``); each has its own key."""

    HEADER_MAC = "header-mac"  # AES-256-GMAC over a frame's prefix and payload MAC
    PAYLOAD_MAC = "payload-mac"  # AES-256-GMAC over a page's payload (integrity only)
    PAYLOAD_ENCRYPTION = "payload-encryption"  # AES-256-GCM of a frame (with --kv-encrypt)
    PAIR_PROOF = "pair-proof"  # HMAC-SHA256 of a pair link's token or challenge (stream
    # socket claim; gloo/nccl store prefix and group challenge: kvtransfer.datapath)


def info(purpose: Purpose, version: int = KV_PROTOCOL_VERSION) -> bytes:
    """The HKDF ``info`` of ``purpose``: names the protocol version and the purpose."""
    return f"pdserve kv v{version} {purpose.value}".encode()


def derive_key(secret: bytes, purpose: Purpose, version: int = KV_PROTOCOL_VERSION) -> bytes:
    """The 32-byte key for ``purpose``; the same secret gives both ends the same key."""
    if len(secret) < 16:
        raise ValueError("the KV channel key must be at least 16 bytes")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=SALT, info=info(purpose, version))
    return hkdf.derive(secret)


class NonceSequence:
    """96-bit nonces, unique for this instance: a random 64-bit prefix and a 32-bit counter
    (a new prefix when the counter would wrap). Safe to call from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._prefix = os.urandom(_PREFIX_BYTES)
        self._counter = 0

    def next(self) -> bytes:
        with self._lock:
            if self._counter > 0xFFFFFFFF:
                self._prefix, self._counter = os.urandom(_PREFIX_BYTES), 0
            counter = self._counter
            self._counter += 1
            return self._prefix + _COUNTER.pack(counter)
