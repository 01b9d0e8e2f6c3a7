"""The transfer ticket a decode worker issues, and the check a prefill worker runs on it
before computing anything."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from core.errors import EngineError

# 3: XXH3-64 checksums, the stream backend (kvtransfer.wire frames); 4: keys derived by
# HKDF-SHA256, counter nonces, encrypted pages (FLAG_ENCRYPTED), secret gloo/nccl store prefixes
KV_PROTOCOL_VERSION = 4
LAYOUT = "L,2,NB,bs,KVH,D"  # engine.kv_cache.KVCache's tensor layout


class IncompatiblePeerError(EngineError):
    """The two ends of a transfer disagree; nothing was sent."""


@dataclass(frozen=True)
class Fingerprint:
    model: str  # the model's fingerprint (config + weight files' content), not its name
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    backend: str
    integrity: str = "xxh3-64"
    """"aes-256-gcm" (encrypted pages) or "aes-256-gmac" with the fleet key, "xxh3-64", "none"."""
    layout: str = LAYOUT
    protocol_version: int = KV_PROTOCOL_VERSION

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


_ENDPOINT = re.compile(r"tcp://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}|(ipc|inproc)://\S+")


@dataclass(frozen=True)
class TransferTicket:
    transfer_id: bytes
    kv_endpoint: str
    block_ids: tuple[int, ...]
    lease_s: float
    fingerprint: Fingerprint  # the decode worker's
    cached_blocks: int = 0
    """Leading blocks the decode worker already holds (a cached prefix): not sent."""

    @property
    def blocks_to_send(self) -> tuple[int, ...]:
        return self.block_ids[self.cached_blocks :]


def check_ticket(ticket: TransferTicket, mine: Fingerprint, num_prompt_blocks: int) -> None:
    """Raise :class:`IncompatiblePeerError` naming what does not match; nothing is sent then."""
    check_match(mine, ticket.fingerprint, "decode worker")
    if len(ticket.block_ids) != num_prompt_blocks:
        raise IncompatiblePeerError(
            f"decode worker reserved {len(ticket.block_ids)} blocks; "
            f"the prompt needs {num_prompt_blocks}"
        )
    if not 0 <= ticket.cached_blocks < len(ticket.block_ids):
        raise IncompatiblePeerError(
            f"ticket skips {ticket.cached_blocks} of {len(ticket.block_ids)} blocks"
        )
    if not _ENDPOINT.fullmatch(ticket.kv_endpoint):
        raise IncompatiblePeerError(f"unsupported KV endpoint {ticket.kv_endpoint!r}")
