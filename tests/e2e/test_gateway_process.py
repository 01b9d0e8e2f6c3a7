"""The gateway process `pdserve up` starts maps no libtorch, and still serves (chat templates
included); the workers beside it do load torch, so the check can tell the two apart."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.client import Client
from pdserve.local_cluster import Cluster

pytestmark = pytest.mark.e2e


def _maps_libtorch(pid: int) -> bool:
    return any("libtorch" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


def test_gateway_has_no_libtorch_mapped(default_cluster: Cluster) -> None:
    with Client(default_cluster.gateway) as client:
        chunks = list(
            client.generate(
                messages=[("user", "What is the capital of France?")],
                max_tokens=4,
                temperature=0,
            )
        )
    assert chunks[-1].completion_tokens == 4 and "".join(c.text for c in chunks)
    children = default_cluster.children()
    assert not _maps_libtorch(children["gateway"].pid), "the gateway process loaded libtorch"
    workers = [c for name, c in children.items() if name != "gateway"]
    assert workers and all(_maps_libtorch(c.pid) for c in workers)
