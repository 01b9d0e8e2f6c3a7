"""The worker runtime and load reporting against a fake engine: they need only AsyncEngine's
public surface (stats, block_size, max_num_seqs, held_prefix_blocks), and a real tiny engine
provides it; load updates stop with the server; the lifecycle is sized from the batch."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import generate_latest

from core.pool_stats import PoolStats
from engine.async_engine import AsyncEngine
from kvtransfer.metrics import TransferStats
from server_runtime.grpc_runtime import Lifecycle
from server_runtime.worker_runtime import ServeOptions, load_updates, worker_metrics
from server_runtime.worker_servicer import LoadReporting
from tests.engine.tiny_engine import engine_config, tiny_model

STATS = PoolStats(
    total_blocks=64, free_blocks=48, running=2, waiting=1, awaiting_kv=3, pool_ok=True,
    num_preemptions=0,
)  # fmt: skip


class FakeEngine:
    """AsyncEngine's public surface that the runtime and the load reports use."""

    block_size = 4
    max_num_seqs = 12

    def __init__(self) -> None:
        self.held: list[list[list[bytes]]] = []

    def stats(self) -> PoolStats:
        return STATS

    def held_prefix_blocks(self, chains: list[list[bytes]]) -> list[int]:
        self.held.append(chains)
        return [len(chain) for chain in chains]  # holds every remembered block


class FakeWorker:
    def __init__(self, engine: object) -> None:
        self.engine = engine

    def stats(self) -> PoolStats:
        return self.engine.stats()  # type: ignore[attr-defined, no-any-return]

    def pending_transfers(self) -> int:
        return 5


class Reporting(LoadReporting):
    tier = "decode"

    def kv_endpoint(self) -> str:
        return "tcp://10.0.0.1:7000"


def test_serve_options_size_the_lifecycle_from_the_batch() -> None:
    assert ServeOptions(max_queue=10).lifecycle(4).max_in_flight == 14
    assert ServeOptions(max_queue=0).lifecycle(4).max_in_flight == 0  # unbounded


def test_load_updates_until_stopped() -> None:
    async def go() -> list[int]:
        stopped = asyncio.Event()
        seen: list[int] = []
        async for n in load_updates(lambda: len(seen), 50, stopped):
            seen.append(n)
            if len(seen) == 3:
                stopped.set()
        return seen

    assert asyncio.run(asyncio.wait_for(go(), 5)) == [0, 1, 2]


def test_worker_metrics_read_the_engine_and_transfers_at_scrape() -> None:
    transfers = TransferStats("zmq")
    registry, _ = worker_metrics("decode", FakeEngine(), lambda: [transfers])  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert 'pdserve_kv_cache_blocks{tier="decode"} 64.0' in text
    assert 'pdserve_kv_cache_usage_ratio{tier="decode"} 0.25' in text


def test_status_uses_the_public_engine_surface() -> None:
    engine = FakeEngine()
    life = Lifecycle(max_in_flight=20)
    reporting = Reporting(FakeWorker(engine), "tiny", life)  # type: ignore[arg-type]
    reporting.record_prompt(list(range(40)))
    msg = reporting._status()
    assert (msg.tier, msg.model, msg.block_size) == ("decode", "tiny", 4)
    assert (msg.total_blocks, msg.free_blocks, msg.awaiting_kv) == (64, 48, 3)
    assert (msg.max_num_seqs, msg.max_in_flight, msg.serving) == (12, 20, True)
    assert msg.kv_endpoint == "tcp://10.0.0.1:7000"
    assert msg.cached_prefix_hashes and engine.held  # asked the engine what it holds


def test_a_real_engine_provides_that_surface(tmp_path_factory: pytest.TempPathFactory) -> None:
    model, spec = tiny_model(tmp_path_factory.mktemp("llama"))
    engine = AsyncEngine(engine_config(spec, num_blocks=32), model, spec)
    assert (engine.block_size, engine.max_num_seqs) == (4, 8)
    assert engine.blocks_for(9) == 3 and engine.stats().total_blocks == 32
    assert engine.held_prefix_blocks([[b"x" * 16]]) == [0]
    msg = Reporting(FakeWorker(engine), "tiny", None)._status()  # type: ignore[arg-type]
    assert msg.total_blocks == 32 and msg.block_size == 4
