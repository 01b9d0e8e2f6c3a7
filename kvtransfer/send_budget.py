"""The sender's books, shared between its owner's threads and its sending thread.

:class:`SendBudget` holds the transfers that are open (opened, not yet acknowledged or
abandoned) and the page bytes queued per decode worker, under one condition: ``send_pages``
waits on it while a peer is over budget, the sending thread releases bytes and wakes it as
pages leave. :func:`check_pages` refuses pages a transfer cannot carry before they are queued.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

import torch

from core.ticket import Fingerprint


@dataclass(frozen=True)
class TransferSpec:
    request_id: str
    transfer_id: bytes
    endpoint: str
    block_ids: tuple[int, ...]


class TransferBackpressureError(Exception):
    """The peer did not drain its queue in time (:class:`SendBudget`); the transfer was
    aborted."""


class SendBudget:
    def __init__(self, max_queued_bytes: int) -> None:
        self.max_queued_bytes = max_queued_bytes
        self._cond = threading.Condition()
        self._queued: collections.Counter[str] = collections.Counter()  # endpoint -> bytes
        self._open: dict[bytes, TransferSpec] = {}

    def open(self, spec: TransferSpec) -> None:
        """Raises ValueError for a transfer id already open."""
        with self._cond:
            if spec.transfer_id in self._open:
                raise ValueError("transfer id already open")
            self._open[spec.transfer_id] = spec

    def spec(self, transfer_id: bytes) -> TransferSpec | None:
        """The open transfer's spec, or None once it ended."""
        with self._cond:
            return self._open.get(transfer_id)

    def close(self, transfer_id: bytes) -> None:
        with self._cond:
            self._open.pop(transfer_id, None)

    def num_open(self) -> int:
        with self._cond:
            return len(self._open)

    def reserve(
        self, endpoint: str, nbytes: int, timeout_s: float, stopping: threading.Event
    ) -> bool:
        """Count ``nbytes`` as queued for ``endpoint``, first waiting while that would put the
        peer over budget (a peer with nothing queued always takes one more). False when the
        budget stayed full past ``timeout_s`` or ``stopping`` was set."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            queued = self._queued[endpoint]
            while queued and queued + nbytes > self.max_queued_bytes:
                left = deadline - time.monotonic()
                if left <= 0 or stopping.is_set():
                    return False
                self._cond.wait(min(left, 0.5))
                queued = self._queued[endpoint]
            self._queued[endpoint] += nbytes
            return True

    def release(self, endpoint: str, nbytes: int) -> None:
        """Pages left the queue (sent or dropped): their bytes leave the budget."""
        with self._cond:
            left = max(0, self._queued[endpoint] - nbytes)  # never below zero
            if left:
                self._queued[endpoint] = left
            else:
                del self._queued[endpoint]  # no entry per peer ever seen
            self._cond.notify_all()

    def queued(self, endpoint: str) -> int:
        with self._cond:
            return self._queued[endpoint]


def check_pages(
    fingerprint: Fingerprint, spec: TransferSpec, layer_start: int, pages: torch.Tensor
) -> None:
    """Refuse (ValueError) pages ``(L', 2, n, bs, KVH, D)`` that ``spec``'s transfer cannot
    carry on a channel of ``fingerprint``."""
    fp = fingerprint
    if pages.dim() != 6 or pages.numel() == 0:
        raise ValueError(f"pages must be a non-empty 6-D tensor, got {tuple(pages.shape)}")
    layers, two, blocks, block_size, kv_heads, head_dim = pages.shape
    if str(pages.dtype).removeprefix("torch.") != fp.dtype:
        raise ValueError(f"pages are {pages.dtype}, the channel carries {fp.dtype}")
    if (two, block_size, kv_heads, head_dim) != (2, fp.block_size, fp.num_kv_heads, fp.head_dim):
        raise ValueError(f"page shape {tuple(pages.shape)} does not match the fingerprint")
    if blocks != len(spec.block_ids):
        raise ValueError(f"{blocks} blocks of pages for {len(spec.block_ids)} reserved")
    if layer_start < 0 or layer_start + layers > fp.num_layers:
        raise ValueError(f"layers [{layer_start}, {layer_start + layers}) out of range")
