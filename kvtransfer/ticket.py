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


def check_ticket(ticket: TransferTicket, mine: Fingerprint, num_prompt_blocks: int) -> None:
    """Raise :class:`IncompatiblePeerError` naming what does not match; nothing is sent then."""
    check_match(mine, ticket.fingerprint, "decode worker")
    if len(ticket.block_ids) != num_prompt_blocks:
        raise IncompatiblePeerError(
            f"decode worker reserved {len(ticket.block_ids)} blocks; "
            f"the prompt needs {num_prompt_blocks}"
        )
    if not _ENDPOINT.fullmatch(ticket.kv_endpoint):
        raise IncompatiblePeerError(f"unsupported KV endpoint {ticket.kv_endpoint!r}")
