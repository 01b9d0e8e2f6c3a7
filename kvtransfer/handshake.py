"""What two ends of a KV transfer must agree on, checked before any page moves.

A prefill worker checks the decode worker's :class:`Fingerprint` (sent in the transfer ticket)
before it computes anything, and the decode worker checks the prefill worker's (sent in the
HELLO that opens every KV connection) before it accepts a frame. A mismatch is refused with an
error that names the field.

On a keyed channel a HELLO is MACed, but a MAC alone does not stop someone who captured one
from sending it again from a connection of their own. So a HELLO also says when it was sent,
and the decode worker accepts each HELLO once, while it is fresh (:class:`HelloGuard`).

A HELLO also names its sender (a random id per :class:`~kvtransfer.sender.KVSender`, under the
same MAC): the decode worker binds each reservation to the sender that first wrote to it
(:func:`sender_of`), so that sender may end it from a new connection (an ABORT after a
reconnect) and no other peer can.

A HELLO also states how much of a PAGE its tag covers (:func:`payload_integrity`), and the
decode worker logs it with the peer it accepts: on nccl only the header is sealed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from core.ticket import Fingerprint, IncompatiblePeerError

HELLO_MAX_AGE_S = 120.0
"""How far a HELLO's send time may be from the receiver's clock (both ways: hosts' clocks
differ a little, NTP keeps them well inside this)."""


class StaleHelloError(IncompatiblePeerError):
    """A HELLO that is old, from the future, without a send time, or seen before."""


def peer_fingerprint(fields: dict[str, Any]) -> Fingerprint:
    """The fingerprint a HELLO or WELCOME carries; :class:`IncompatiblePeerError` when it
    carries none, or something that is not a JSON object."""
    theirs = fields.get("fingerprint", {})
    if not isinstance(theirs, dict):
        raise IncompatiblePeerError(f"peer fingerprint is not an object: {type(theirs).__name__}")
    return Fingerprint.from_fields(theirs)


MAX_SENDER_ID_CHARS = 64

HEADER_ONLY = "header_only"
TAGGED = "header_and_payload"


def payload_integrity(backend: str) -> str:
    """What a PAGE's tag (MAC or checksum) covers on ``backend``: :data:`TAGGED` (header and
    payload), or :data:`HEADER_ONLY` on nccl, whose payload goes GPU to GPU through
    torch.distributed without its bytes ever reaching the host: a forged or corrupted nccl
    payload under an authentic header is not detected (a known limitation)."""
    return HEADER_ONLY if backend == "nccl" else TAGGED


def hello_fields(
    fingerprint: Fingerprint, clock: Callable[[], float] = time.time, sender: str = ""
) -> dict[str, Any]:
    """What a HELLO carries: the sender's fingerprint, when it was sent (wall clock), what
    its PAGE tags cover (:func:`payload_integrity`) and, if given, the sender's id."""
    fields: dict[str, Any] = {
        "fingerprint": fingerprint.to_fields(),
        "sent_at": clock(),
        "payload_integrity": payload_integrity(fingerprint.backend),
    }
    if sender:
        fields["sender"] = sender
    return fields


def sender_of(hello: dict[str, Any], identity: bytes) -> str:
    """Who a welcomed HELLO came from: its ``sender`` id (a string of at most
    :data:`MAX_SENDER_ID_CHARS`), or, for a HELLO without a usable one (an older pdserve, a
    hand-driven peer), the connection ``identity`` it came on."""
    sender = hello.get("sender")
    if isinstance(sender, str) and 0 < len(sender) <= MAX_SENDER_ID_CHARS:
        return f"sender:{sender}"
    return f"connection:{identity.hex()}"


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
        try:
            age = now - sent
        except OverflowError:  # an integer past any float
            age = float("inf")
        if abs(age) > self.max_age_s:
            raise StaleHelloError(
                f"HELLO sent {age:+.0f}s from this worker's clock (more than "
                f"{self.max_age_s:.0f}s): replayed, or the hosts' clocks disagree"
            )
        self._seen = {k: v for k, v in self._seen.items() if v > now} if self._seen else {}
        if hello_id in self._seen:
            raise StaleHelloError("HELLO seen before: replayed")
        self._seen[hello_id] = sent + 2 * self.max_age_s
