"""Bridges the engine thread to asyncio: each request's outputs arrive on its own queue.

gRPC handlers on the event loop call :meth:`AsyncEngine.submit` or :meth:`AsyncEngine.reserve`,
then iterate :meth:`RequestHandle.outputs`. Leaving that iteration early (the caller cancelled,
the deadline passed) must be followed by :meth:`RequestHandle.close`, which aborts the request in
the engine and frees its blocks; ``close`` is idempotent and safe after a normal finish. This is
the workers' whole view of the engine: requests, connectors, stats, block geometry, and the
engine thread's :class:`~engine.engine_thread.StepMonitor` with :meth:`AsyncEngine.fail_requests`
(what a watchdog needs once the engine is stuck).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import torch

from core.pool_stats import PoolStats
from core.sampling import FinishReason, SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine, RequestOutput
from engine.engine_thread import StepMonitor
from engine.kv_cache import KVCache
from engine.kv_connector import ExportConnector, ImportConnector, Reservation
from engine.model_files import ModelSpec
from engine.sequence import Sequence

_Delivery = RequestOutput | BaseException
"""What a request's queue carries: its outputs, or the error that ended it."""


class RequestHandle:
    """One request's view of the engine: its outputs, and the means to stop it."""

    def __init__(self, owner: AsyncEngine, key: str, queue: asyncio.Queue[_Delivery]):
        self._owner = owner
        self.key = key
        self._queue = queue
        self.finished = False

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Yield outputs until (and including) the one with a finish reason."""
        while not self.finished:
            yield await self.next_output()

    async def next_output(self) -> RequestOutput:
        """The next output; raises the error :meth:`AsyncEngine.fail_requests` was given."""
        out = await self._queue.get()
        if isinstance(out, BaseException):
            self.finished = True  # the engine will not be asked to abort it (it may be stuck)
            self._owner._forget(self.key)
            raise out
        if out.finish_reason is not None:
            self.finished = True
            self._owner._forget(self.key)
        return out

    def close(self, reason: FinishReason = FinishReason.CANCELLED) -> None:
        """Abort the request unless it finished; frees its blocks. Idempotent."""
        if not self.finished:
            self.finished = True
            self._owner._forget(self.key)
            self._owner.engine.abort(self.key, reason)


class AsyncEngine:
    def __init__(self, config: EngineConfig, model: torch.nn.Module, spec: ModelSpec) -> None:
        self.config = config
        self.engine = Engine(config, model, spec, self._sink)
        self.spec = self.engine.spec  # with the weights the engine computes from
        self._queues: dict[str, asyncio.Queue[_Delivery]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()

    def new_sequence(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        resumed_tokens: int = 0,
    ) -> Sequence:
        """A sequence keyed uniquely on this worker (callers may reuse request ids);
        ``resumed_tokens``: trailing prompt tokens generated before a failover resume."""
        return Sequence(
            request_id=f"{request_id}#{uuid.uuid4().hex[:12]}",
            token_ids=list(prompt_token_ids),
            num_prompt_tokens=len(prompt_token_ids),
            sampling=sampling,
            eos_token_ids=self.spec.eos_token_ids,
            resumed_tokens=min(max(0, resumed_tokens), len(prompt_token_ids)),
        )

    def submit(self, seq: Sequence, *, export_kv: bool = False) -> RequestHandle:
        handle = self._register(seq.request_id)
        try:
            self.engine.add(seq, export_kv=export_kv)
        except BaseException:
            self._forget(seq.request_id)
            raise
        return handle

    def reserve(self, seq: Sequence) -> tuple[RequestHandle, list[int]]:
        handle = self._register(seq.request_id)
        try:
            block_ids = list(self.engine.reserve_import(seq).block_ids)
        except BaseException:
            self._forget(seq.request_id)
            raise
        return handle, block_ids

    def reserve_import(self, seq: Sequence) -> tuple[RequestHandle, Reservation]:
        """Reserve blocks for a prompt an importer writes; see :meth:`Engine.reserve_import`."""
        handle = self._register(seq.request_id)
        try:
            reservation = self.engine.reserve_import(seq)
        except BaseException:
            self._forget(seq.request_id)
            raise
        return handle, reservation

    def abort(
        self, key: str, reason: FinishReason = FinishReason.CANCELLED, error: str | None = None
    ) -> None:
        """Stop a request by engine key (any thread); see :meth:`Engine.abort`."""
        self.engine.abort(key, reason, error)

    def park_all(self) -> None:
        """Park every decoding sequence for migration (see :meth:`Engine.park_all`)."""
        self.engine.park_all()

    def parked_pages(self, key: str, skip: int = 0) -> tuple[torch.Tensor, int, int]:
        """A parked sequence's KV copy past ``skip`` blocks, last token and positions computed
        (any thread; see :meth:`Engine.parked_pages`)."""
        return self.engine.parked_pages(key, skip)

    def unpark(self, key: str) -> bool:
        """Let a parked sequence decode here after all (it parks no more); False: not parked."""
        return self.engine.unpark(key)

    def set_export_connector(self, connector: ExportConnector | None) -> None:
        self.engine.set_export_connector(connector)

    def set_import_connector(self, connector: ImportConnector | None) -> None:
        self.engine.set_import_connector(connector)

    def stats(self) -> PoolStats:
        return self.engine.stats()

    @property
    def monitor(self) -> StepMonitor:
        """The engine thread's progress, readable from any thread without a lock."""
        return self.engine.monitor

    def fail_requests(self, error: BaseException) -> int:
        """End every open request with ``error`` (raised from its handle's outputs), without
        asking the engine anything: for an engine that is stuck. Event loop only; returns how
        many requests it ended. Their blocks stay taken (the process is about to exit)."""
        queues = list(self._queues.values())
        for queue in queues:
            queue.put_nowait(error)
        return len(queues)

    def held_prefix_blocks(self, chains: list[list[bytes]]) -> list[int]:
        return self.engine.held_prefix_blocks(chains)

    @property
    def block_size(self) -> int:
        """Tokens per KV block."""
        return self.engine.kv_cache.block_size

    @property
    def max_num_seqs(self) -> int:
        """Sequences one step may batch."""
        return self.config.scheduler.max_num_seqs

    def blocks_for(self, num_tokens: int) -> int:
        """KV blocks that ``num_tokens`` tokens take."""
        return self.engine.scheduler.blocks_for(num_tokens)

    def kv_store(self) -> KVCache:
        """The paged KV tensor, for transports: read pages of exporting prompts, write pages
        only into the ``writable`` blocks of a live :class:`Reservation`."""
        return self.engine.kv_cache

    def _register(self, key: str) -> RequestHandle:
        queue: asyncio.Queue[_Delivery] = asyncio.Queue()
        self._queues[key] = queue
        return RequestHandle(self, key, queue)

    def _forget(self, key: str) -> None:
        self._queues.pop(key, None)

    def _sink(self, outputs: list[RequestOutput]) -> None:
        """Called on the engine (or KV receiver) thread."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
