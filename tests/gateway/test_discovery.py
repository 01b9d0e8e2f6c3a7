"""Worker discovery: targets, DNS names that resolve to many workers, the registry following
workers as they come, drain and go."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.discovery import Target, addresses_of
from gateway.registry import TierRegistry
from gateway.worker_clients import WorkerStatus
from gateway.worker_entry import WorkerState
from tests.gateway.fakes import load


def test_targets_parse() -> None:
    assert Target.parse("10.0.0.1:50071") == Target("10.0.0.1", 50071, False)
    assert Target.parse("dns:///decode.pdserve:50071") == Target("decode.pdserve", 50071, True)
    assert str(Target.parse("dns:///decode:1")) == "dns:///decode:1"
    for bad in ("decode", "decode:", ":50071", "dns:///decode:port"):
        with pytest.raises(ValueError, match="host:port"):
            Target.parse(bad)


def test_dns_names_expand_to_every_address() -> None:
    async def resolve(host: str, port: int) -> list[str]:
        return ["10.0.0.2", "10.0.0.1", "fd00::1"]

    async def fail(host: str, port: int) -> list[str]:
        raise OSError("no such host")

    target = Target.parse("dns:///decode:50071")
    found = asyncio.run(addresses_of(target, resolve))
    assert found == {"10.0.0.1:50071", "10.0.0.2:50071", "[fd00::1]:50071"}
    assert asyncio.run(addresses_of(target, fail)) is None
    assert asyncio.run(addresses_of(Target.parse("a:1"), fail)) == {"a:1"}


class ScriptedClient:
    """A worker whose health and load streams the test drives."""

    tier = "decode"

    def __init__(self, address: str) -> None:
        self.address = address
        self.loads: asyncio.Queue[WorkerStatus | Exception] = asyncio.Queue()
        self.health: asyncio.Queue[bool] = asyncio.Queue()
        self.closed = False

    async def watch_load(self, interval_ms: int) -> AsyncIterator[WorkerStatus]:
        while True:
            item = await self.loads.get()
            if isinstance(item, Exception):
                raise item
            yield item

    async def watch_health(self) -> AsyncIterator[bool]:
        while True:
            yield await self.health.get()

    async def close(self) -> None:
        self.closed = True


async def _until(predicate, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)


def test_registry_follows_workers_that_come_drain_die_and_leave() -> None:
    async def body() -> None:
        answers = [["10.0.0.1"]]
        clients: dict[str, ScriptedClient] = {}

        async def resolve(host: str, port: int) -> list[str]:
            return answers[-1]

        def make(address: str) -> ScriptedClient:
            clients[address] = ScriptedClient(address)
            return clients[address]

        tier = TierRegistry(
            "decode", ["dns:///decode:7"], make, resolve=resolve, resolve_interval_s=0.05
        )  # type: ignore[arg-type]
        await tier.start()
        first = clients["10.0.0.1:7"]
        assert tier.routable() == []  # connecting: nothing heard yet
        first.health.put_nowait(True)
        first.loads.put_nowait(load())
        await _until(lambda: len(tier.routable()) == 1)

        answers.append(["10.0.0.1", "10.0.0.2"])  # scale up: found by re-resolution
        await _until(lambda: "10.0.0.2:7" in clients)
        second = clients["10.0.0.2:7"]
        second.health.put_nowait(True)
        second.loads.put_nowait(load())
        await _until(lambda: len(tier.routable()) == 2)

        first.health.put_nowait(False)  # drain: NOT_SERVING
        await _until(lambda: tier.entries["10.0.0.1:7"].state is WorkerState.DRAINING)
        assert [e.address for e in tier.routable()] == ["10.0.0.2:7"]

        second.loads.put_nowait(ConnectionError("reset"))  # death: the stream breaks
        await _until(lambda: tier.entries["10.0.0.2:7"].state is WorkerState.DOWN)
        assert tier.routable() == []
        second.health.put_nowait(True)  # back (restarted): followed again after a retry
        second.loads.put_nowait(load())
        await _until(lambda: len(tier.routable()) == 1)

        answers.append(["10.0.0.2"])  # scale down: retired, channel closed once idle
        await _until(lambda: "10.0.0.1:7" not in tier.entries)
        await _until(lambda: first.closed)
        await tier.close()
        assert second.closed

    asyncio.run(body())
