"""Fixtures of the KV transfer contract suite: every test that takes ``transport`` runs once per
backend that works on CPU, and everything it starts is stopped at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvtransfer.datapath import Backend
from tests.kvtransfer.dying_sender import DyingSenders
from tests.kvtransfer.harness import Channel, Transport

TRANSPORTS = ("tcp", "ipc", "inproc", "stream", "stream-ipc", "gloo")


@pytest.fixture(params=TRANSPORTS)
def transport(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Transport:
    backend = {"gloo": Backend.GLOO, "stream": Backend.STREAM, "stream-ipc": Backend.STREAM}.get(
        request.param, Backend.ZMQ
    )
    return Transport(request.param, backend, tmp_path_factory.mktemp("kv"))


@pytest.fixture
def make_channel(transport: Transport) -> Iterator[Callable[..., Channel]]:
    made: list[Channel] = []

    def make(**kwargs: Any) -> Channel:
        channel = Channel(transport, **kwargs)
        made.append(channel)
        return channel

    yield make
    for channel in made:
        channel.close()


@pytest.fixture
def channel(make_channel: Callable[..., Channel]) -> Channel:
    return make_channel()


@pytest.fixture(scope="session", autouse=True)
def dying_senders(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DyingSenders]:
    """Start the sender processes the selected kill tests need right away, so that they import
    torch while other tests run."""
    count = sum(
        1
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_lease_expires_when_the_sender_process_dies"
        and "[inproc]" not in item.name
    )
    senders = DyingSenders(tmp_path_factory.mktemp("senders"), count)
    yield senders
    senders.close()
