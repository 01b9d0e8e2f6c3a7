"""The transfer ticket a decode worker issues, and the check a prefill worker runs on it
before computing anything: a ticket that passes names a fingerprint equal to the prefill's, a
block list the prompt fills, and a KV endpoint a sender can connect to as written (tcp with an
IP address or DNS name and a port in 1-65535, an ipc path a unix socket can hold, inproc)."""

from __future__ import annotations

import ipaddress
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
    weights: str = "float"
    """What the linear layers compute from (``float``, ``gguf:Q4_1+Q8_0``, ``int8:q8_0``):
    tiers computing from different numbers would hand each other pages of another model."""
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
_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_MAX_DNS_NAME_CHARS = 253
_MAX_IPC_PATH_BYTES = 107  # a unix socket's sun_path: 108 bytes with the terminating NUL


def check_endpoint(endpoint: str) -> None:
    """Raise :class:`IncompatiblePeerError` unless a sender can connect to ``endpoint``."""
    if not _ENDPOINT.fullmatch(endpoint):
        raise IncompatiblePeerError(f"unsupported KV endpoint {endpoint!r}")
    scheme, _, rest = endpoint.partition("://")
    if scheme == "ipc" and len(rest.encode()) > _MAX_IPC_PATH_BYTES:
        raise IncompatiblePeerError(
            f"KV endpoint {endpoint!r}: ipc path longer than {_MAX_IPC_PATH_BYTES} bytes"
        )
    if scheme != "tcp":
        return
    host, _, port = rest.rpartition(":")
    if not 1 <= int(port) <= 65535:
        raise IncompatiblePeerError(f"KV endpoint {endpoint!r}: port {port} is not 1-65535")
    if not _is_host(host):
        raise IncompatiblePeerError(
            f"KV endpoint {endpoint!r}: host {host!r} is not an IP address or a DNS name"
        )


def _is_host(host: str) -> bool:
    """An IPv6 address in brackets, a dotted IPv4 address, or a DNS name (RFC 1123 labels)."""
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    labels = host.split(".")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return len(host) <= _MAX_DNS_NAME_CHARS and all(_DNS_LABEL.fullmatch(x) for x in labels)


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
    check_endpoint(ticket.kv_endpoint)
