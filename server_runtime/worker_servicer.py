"""What the prefill and decode servicers share: ``GetStatus`` and ``WatchLoad``, the load the
gateway routes on (with the prefix-cache summary). A servicer module: it may touch protos."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import grpc

from core.pool_stats import PoolStats
from core.prefix_summary import PrefixSummary
from engine.async_engine import AsyncEngine
from protos.pdserve.v1 import worker_pb2
from server_runtime.grpc_runtime import Lifecycle
from server_runtime.proto_convert import status_to_proto
from server_runtime.worker_runtime import load_updates


class TierWorker(Protocol):
    engine: AsyncEngine

    def stats(self) -> PoolStats: ...
    def pending_transfers(self) -> int: ...


class LoadReporting:
    """``GetStatus`` and ``WatchLoad`` for a worker servicer (list it before the generated
    servicer base). Work calls :meth:`record_prompt` so the summary knows their prompts."""

    tier = ""

    def __init__(self, worker: TierWorker, model_name: str, lifecycle: Lifecycle | None) -> None:
        self.worker = worker
        self.model_name = model_name
        self.lifecycle = lifecycle or Lifecycle()
        self.prefixes = PrefixSummary(worker.engine.block_size)

    def record_prompt(self, prompt: list[int]) -> None:
        self.prefixes.record(prompt)

    def kv_endpoint(self) -> str:
        """Where prefill workers push pages to this worker ("" on the prefill tier)."""
        return ""

    def _status(self) -> worker_pb2.WorkerStatus:
        stats = self.worker.stats()
        engine = self.worker.engine
        msg = status_to_proto(
            self.tier,
            self.model_name,
            stats,
            engine.block_size,
            self.worker.pending_transfers(),
            kv_endpoint=self.kv_endpoint(),
        )
        life = self.lifecycle
        msg.serving = not life.draining
        msg.awaiting_kv = stats.awaiting_kv
        msg.in_flight = life.in_flight
        msg.max_in_flight = life.max_in_flight
        msg.requests_total = life.total
        msg.max_num_seqs = engine.max_num_seqs
        msg.cached_prefix_hashes.extend(self.prefixes.advertised(engine.held_prefix_blocks))
        return msg

    async def GetStatus(
        self, request: worker_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerStatus:
        return self._status()

    async def WatchLoad(
        self, request: worker_pb2.WatchLoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.WorkerStatus]:
        async for msg in load_updates(self._status, request.interval_ms, self.lifecycle.stopped):
            yield msg
