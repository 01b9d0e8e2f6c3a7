"""The transfer ticket a decode worker issues, and the compatibility check a sender runs on it."""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import EngineError
from engine.kv_cache import KVCache


class IncompatiblePeerError(EngineError):
    """The two ends of a transfer disagree on the KV layout; nothing was sent."""


@dataclass(frozen=True)
class TransferTicket:
    transfer_id: bytes
    kv_endpoint: str
    block_ids: tuple[int, ...]
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    lease_s: float


def check_compatible(ticket: TransferTicket, kv_cache: KVCache, num_prompt_blocks: int) -> None:
    """Raise :class:`IncompatiblePeerError` naming the first field on which the peers differ."""
    mine = {
        "block_size": kv_cache.block_size,
        "num_layers": kv_cache.num_layers,
        "num_kv_heads": kv_cache.num_kv_heads,
        "head_dim": kv_cache.head_dim,
        "dtype": str(kv_cache.dtype).removeprefix("torch."),
        "num_blocks": num_prompt_blocks,
    }
    theirs = {
        "block_size": ticket.block_size,
        "num_layers": ticket.num_layers,
        "num_kv_heads": ticket.num_kv_heads,
        "head_dim": ticket.head_dim,
        "dtype": ticket.dtype,
        "num_blocks": len(ticket.block_ids),
    }
    for name, value in mine.items():
        if theirs[name] != value:
            raise IncompatiblePeerError(
                f"decode worker's {name} is {theirs[name]!r}, this prefill worker's is {value!r}"
            )
    if not ticket.kv_endpoint.startswith(("tcp://", "ipc://")):
        raise IncompatiblePeerError(f"unsupported KV endpoint {ticket.kv_endpoint!r}")
