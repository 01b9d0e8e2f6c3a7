"""The transfer ticket a decode worker issues, and the check a prefill worker runs on it
before computing anything."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvtransfer.handshake import Fingerprint, IncompatiblePeerError, check_match

__all__ = ["IncompatiblePeerError", "TransferTicket", "check_ticket"]

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
