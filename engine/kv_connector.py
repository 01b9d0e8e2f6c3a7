"""The engine's KV connector seam: how a prompt's KV pages leave a prefill engine and enter a
decode engine, with no transport in sight (kvtransfer and the workers implement the other side).

Export: the engine calls :meth:`ExportConnector.save_layer` on its thread, mid-forward, once per
layer of each exporting prompt (``LAYERWISE``), or puts all pages on the prompt's last output
(``AFTER_PREFILL``). Import: the engine hands out a :class:`Reservation`; the importer writes only
its ``writable`` blocks, and reports each import's end to an :class:`ImportConnector` that the
engine drains at the start of every step (READY admits, FAILED frees the blocks).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog
import torch

from engine.kv_cache import KVCache

log = structlog.get_logger(__name__)


class ExportMode(enum.Enum):
    """When an exporting prompt's pages leave the engine."""

    LAYERWISE = "layerwise"  # each layer as the forward pass finishes it
    AFTER_PREFILL = "after_prefill"  # all layers on the prompt's last RequestOutput


@dataclass(frozen=True)
class LayerPages:
    """One layer of an exporting prompt's KV, valid only for the duration of the call."""

    request_id: str  # the engine key of the sequence
    layer: int
    pages: torch.Tensor  # (1, 2, n, bs, KVH, D), a copy of the prompt's blocks


class ExportConnector(Protocol):
    """Prefill side. ``save_layer`` runs on the engine thread while the forward pass goes on:
    it must not block for long, and its exceptions are logged and fail only that transfer."""

    @property
    def mode(self) -> ExportMode: ...

    def save_layer(self, layer: LayerPages) -> None: ...


LayerSink = Callable[[str, int, torch.Tensor], None]
"""``(request key, layer, pages (1, 2, n, bs, KVH, D))``: one layer of an exporting prompt's KV,
called on the engine thread while the forward pass continues with the next layer (the callable
form of a LAYERWISE :class:`ExportConnector`, see :class:`LayerSinkExport`)."""


def layer_saver(
    exporter: ExportConnector, kv_cache: KVCache, exporting: list[tuple[str, list[int]]]
) -> Callable[[int], None]:
    """The layer listener of a step whose ``exporting`` prompts (key, their blocks) complete:
    saves each finished layer's pages of each through ``exporter`` (engine thread)."""

    def on_layer(layer: int) -> None:
        for key, blocks in exporting:
            pages = kv_cache.gather_pages(blocks, slice(layer, layer + 1))
            try:
                exporter.save_layer(LayerPages(key, layer, pages))
            except Exception:  # the connector's failure is that one transfer's alone
                log.exception("kv_layer_export_failed", layer=layer)

    return on_layer


@dataclass(frozen=True)
class LayerSinkExport:
    """An :class:`ExportConnector` over a plain ``(key, layer, pages)`` callable."""

    sink: Callable[[str, int, torch.Tensor], None]

    @property
    def mode(self) -> ExportMode:
        return ExportMode.LAYERWISE

    def save_layer(self, layer: LayerPages) -> None:
        self.sink(layer.request_id, layer.layer, layer.pages)


@dataclass(frozen=True)
class Reservation:
    """Blocks reserved for a prompt another worker computes. The leading ``cached_blocks`` are
    shared prefix-cache blocks already holding the right KV: they must not be written."""

    request_id: str
    block_ids: tuple[int, ...]
    cached_blocks: int

    @property
    def writable(self) -> tuple[int, ...]:
        """The blocks an importer may write pages into."""
        return self.block_ids[self.cached_blocks :]


class ImportStatus(enum.Enum):
    READY = "ready"  # every page arrived: admit with the prefill worker's first token
    FAILED = "failed"  # bad frame, abort, lease expired: free the blocks, report ``error``


@dataclass(frozen=True)
class ImportResult:
    request_id: str
    status: ImportStatus
    first_token_id: int = 0  # READY only
    error: str = ""  # FAILED only


class ImportConnector(Protocol):
    """Decode side: where imports report their end. The engine calls :meth:`bind` once with a
    callback that wakes its loop, and :meth:`take_finished` at the start of each step."""

    def bind(self, wake: Callable[[], None]) -> None: ...

    def has_finished(self) -> bool: ...

    def take_finished(self) -> list[ImportResult]: ...


class ImportQueue:
    """A thread-safe :class:`ImportConnector`: importers call :meth:`ready` and :meth:`failed`
    from any thread (never holding the engine's lock); the engine drains them in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._results: list[ImportResult] = []
        self._wake: Callable[[], None] | None = None

    def bind(self, wake: Callable[[], None]) -> None:
        self._wake = wake

    def ready(self, request_id: str, first_token_id: int) -> None:
        self._put(ImportResult(request_id, ImportStatus.READY, first_token_id=first_token_id))

    def failed(self, request_id: str, reason: str) -> None:
        self._put(ImportResult(request_id, ImportStatus.FAILED, error=reason))

    def has_finished(self) -> bool:
        with self._lock:
            return bool(self._results)

    def take_finished(self) -> list[ImportResult]:
        with self._lock:
            results, self._results = self._results, []
        return results

    def _put(self, result: ImportResult) -> None:
        with self._lock:
            self._results.append(result)
        if self._wake is not None:
            self._wake()
