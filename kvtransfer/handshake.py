"""What two ends of a KV transfer must agree on, checked before any page moves.

A prefill worker checks the decode worker's :class:`Fingerprint` (sent in the transfer ticket)
before it computes anything, and the decode worker checks the prefill worker's (sent in the
HELLO that opens every KV connection) before it accepts a frame. A mismatch is refused with an
error that names the field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from engine.errors import EngineError
from kvtransfer import wire

LAYOUT = "L,2,NB,bs,KVH,D"  # engine.kv_cache.KVCache's tensor layout


class IncompatiblePeerError(EngineError):
    """The two ends of a transfer disagree; nothing was sent."""


@dataclass(frozen=True)
class Fingerprint:
    model: str  # the model's fingerprint (config + weight files), not its name
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    backend: str
    integrity: str = "xxh3-64"  # "aes-256-gmac" with the fleet key, "xxh3-64", or "none"
    layout: str = LAYOUT
    protocol_version: int = wire.PROTOCOL_VERSION

    def to_fields(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> Fingerprint:
        names = {f.name: f.type for f in fields(cls)}
        missing = sorted(set(names) - set(data))
        if missing:
            raise IncompatiblePeerError(f"peer fingerprint lacks {', '.join(missing)}")
        try:
            return cls(**{name: data[name] for name in names})
        except TypeError as exc:
            raise IncompatiblePeerError(f"peer fingerprint is malformed: {exc}") from None


def check_match(mine: Fingerprint, theirs: Fingerprint, peer: str) -> None:
    """Raise :class:`IncompatiblePeerError` naming the first field on which we differ."""
    for field in fields(Fingerprint):
        a, b = getattr(mine, field.name), getattr(theirs, field.name)
        if a != b:
            raise IncompatiblePeerError(
                f"{peer}'s {field.name} is {b!r}, this worker's is {a!r}: refusing KV transfer"
            )
