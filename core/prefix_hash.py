"""Content hashes of full KV blocks, chained so a hash names a whole prefix.

``hash_i = H(hash_{i-1} || tokens of block i)``: two sequences share block ``i``'s KV exactly
when their first ``(i + 1) * block_size`` tokens agree. BLAKE2b-128 over the token ids as
little-endian u32 is stable across processes, so a hash means the same on every worker (the
router's prefix-affinity summaries rely on that).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT = bytes(16)


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    data = array("I", tokens)
    if data.itemsize != 4:  # pragma: no cover - "I" is 4 bytes on every supported platform
        raise RuntimeError("unsigned int is not 4 bytes here")
    return hashlib.blake2b(parent + data.tobytes(), digest_size=16).digest()


def prefix_hashes(
    tokens: Sequence[int], block_size: int, start: int = 0, parent: bytes = ROOT
) -> list[bytes]:
    """Hashes of full blocks ``start, start + 1, ...`` of ``tokens`` (``parent`` is block
    ``start - 1``'s hash)."""
    hashes = []
    for index in range(start, len(tokens) // block_size):
        parent = block_hash(parent, tokens[index * block_size : (index + 1) * block_size])
        hashes.append(parent)
    return hashes
