"""What two ends of a KV transfer must agree on, checked before any page moves.

A prefill worker checks the decode worker's :class:`Fingerprint` (sent in the transfer ticket)
before it computes anything, and the decode worker checks the prefill worker's (sent in the
HELLO that opens every KV connection) before it accepts a frame. A mismatch is refused with an
error that names the field.

On a keyed channel a HELLO is MACed, but a MAC alone does not stop someone who captured one
from sending it again from a connection of their own. So a HELLO also says when it was sent,
and the decode worker accepts each HELLO once, while it is fresh (:class:`HelloGuard`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
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


HELLO_MAX_AGE_S = 120.0
"""How far a HELLO's send time may be from the receiver's clock (both ways: hosts' clocks
differ a little, NTP keeps them well inside this)."""


class StaleHelloError(IncompatiblePeerError):
    """A HELLO that is old, from the future, without a send time, or seen before."""


def hello_fields(
    fingerprint: Fingerprint, clock: Callable[[], float] = time.time
) -> dict[str, Any]:
    """What a HELLO carries: the sender's fingerprint and when it was sent (wall clock)."""
    return {"fingerprint": fingerprint.to_fields(), "sent_at": clock()}


class HelloGuard:
    """Accepts each (MAC-verified) HELLO once, within ``max_age_s`` of its send time. Memory
    stays bounded: only HELLOs accepted in the last ``2 * max_age_s`` are remembered."""

    def __init__(
        self, max_age_s: float = HELLO_MAX_AGE_S, clock: Callable[[], float] = time.time
    ) -> None:
        self.max_age_s = max_age_s
        self._clock = clock
        self._seen: dict[bytes, float] = {}  # hello id -> when it may be forgotten

    def admit(self, hello_id: bytes, hello: dict[str, Any]) -> None:
        """Raise :class:`StaleHelloError` unless this HELLO is fresh and new."""
        now = self._clock()
        sent = hello.get("sent_at")
        if not isinstance(sent, int | float) or isinstance(sent, bool) or sent != sent:
            raise StaleHelloError("HELLO carries no send time (an older pdserve?)")
        age = now - sent
        if abs(age) > self.max_age_s:
            raise StaleHelloError(
                f"HELLO sent {age:+.0f}s from this worker's clock (more than "
                f"{self.max_age_s:.0f}s): replayed, or the hosts' clocks disagree"
            )
        self._seen = {k: v for k, v in self._seen.items() if v > now} if self._seen else {}
        if hello_id in self._seen:
            raise StaleHelloError("HELLO seen before: replayed")
        self._seen[hello_id] = sent + 2 * self.max_age_s
