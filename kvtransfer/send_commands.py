"""The sender's typed commands: what :class:`~kvtransfer.sender.KVSender`'s calls queue.

Each command is a frozen value naming its transfer; the sending thread runs a peer's commands
in the order queued. A :class:`SendPages` holds bytes counted in the sender's
:class:`~kvtransfer.send_budget.SendBudget`: whoever takes it off a queue, sent or dropped,
releases them, exactly once. A :class:`Retract` is the sending thread's own, never an owner's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

import torch

from kvtransfer.send_budget import TransferSpec
from kvtransfer.staging import StagedPages

__all__ = ["Abort", "Command", "Finish", "Open", "Retract", "SendPages"]


@dataclass(frozen=True)
class Open:
    """Start a transfer (its peer's handshake, if new, begins with it)."""

    spec: TransferSpec

    @property
    def transfer_id(self) -> bytes:
        return self.spec.transfer_id


@dataclass(frozen=True, eq=False)
class SendPages:
    """Pages ``(L', 2, n, bs, KVH, D)`` for layers from ``layer_start``, already checked and
    counted as ``nbytes`` queued for ``endpoint`` in the :class:`SendBudget`: whoever takes
    this command off a queue (sent or dropped) releases them, and with them its ``staged``
    host copy (CUDA pages on a socket backend: ``kvtransfer.staging``), if any."""

    transfer_id: bytes
    layer_start: int
    pages: torch.Tensor
    nbytes: int
    endpoint: str
    staged: StagedPages | None = None

    def ready(self) -> torch.Tensor:
        """The pages to send: the staged host copy once its copy is done, else ``pages``."""
        return self.pages if self.staged is None else self.staged.wait()

    def release_staged(self) -> None:
        """Give the staged copy's buffer back (sent or dropped; again is harmless)."""
        if self.staged is not None:
            self.staged.release()


@dataclass(frozen=True)
class Finish:
    """Every page is queued: send DONE with the first token, then await the ack."""

    transfer_id: bytes
    first_token_id: int


@dataclass(frozen=True)
class Abort:
    """Drop the transfer and tell the peer (its reservation is freed at once)."""

    transfer_id: bytes
    reason: str


@dataclass(frozen=True)
class Retract:
    """Tell the peer that a transfer it may still hold a reservation for failed here after
    frames of it went out (their connection dropped, an ack never came, a stranger's nack):
    an ABORT, sent once the peer is handshaken again, frees that reservation at once instead
    of at its lease. The transfer itself has already ended on this side."""

    transfer_id: bytes
    reason: str


Command: TypeAlias = Open | SendPages | Finish | Abort | Retract
