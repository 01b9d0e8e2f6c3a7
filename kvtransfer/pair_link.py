"""What every out-of-band backend's per-pair payload channel offers (``kvtransfer.datapath``
makes them): a :class:`PairLink` per (prefill, decode) pair, made by the decode side's
:class:`PairHost` and joined by the sender.
"""

from __future__ import annotations

import abc
from typing import Any

import torch


class PairLinkError(ConnectionError):
    """The pair's payload stream broke (peer gone, stalled past its timeout): the peer must
    handshake again."""


class PairLink(abc.ABC):
    """One (prefill, decode) pair's payload channel; payloads arrive in the order sent."""

    @abc.abstractmethod
    def send(self, tensor: torch.Tensor) -> None:
        """Sender: push one payload (blocks until handed to the transport)."""

    @abc.abstractmethod
    def receive(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Any:
        """Receiver: the next payload, as a new tensor of this shape."""

    def discard(self, nbytes: int) -> None:
        """Receiver: take the next payload off the channel and drop it."""
        self.receive((nbytes,), torch.uint8, torch.device("cpu"))

    def close(self) -> None:  # noqa: B027 - a group needs no closing
        """Release the channel (idempotent)."""


class PairHost(abc.ABC):
    """Decode side: offers rendezvous details to each new peer and accepts its link."""

    @abc.abstractmethod
    def offer(self) -> dict[str, object]:
        """Rendezvous details for one new peer (goes into WELCOME)."""

    @abc.abstractmethod
    def accept(self, offer: dict[str, object]) -> PairLink:
        """This side of the pair's link; blocks until the peer joins (or raises)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop offering; links already made stay usable."""


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A CPU tensor's bytes without a copy (for tags, in-band frames and direct reads; a
    non-contiguous tensor is copied first)."""
    raw = tensor.contiguous().view(torch.uint8).numpy()
    return memoryview(raw).cast("B")  # type: ignore[arg-type]
