"""Greedy output stays token-identical to transformers whichever way the KV pages travel."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pdserve.local_cluster import Cluster
from tests.e2e.test_generation import (
    DEFAULT_PROMPTS,
    _assert_matches_transformers,
    _run_concurrently,
)

pytestmark = pytest.mark.e2e


def test_each_transfer_variant_matches_transformers(
    transfer_variant_cluster: Cluster, default_model_path: Path
):
    prompts = DEFAULT_PROMPTS[:3]
    results = asyncio.run(_run_concurrently(transfer_variant_cluster, prompts))
    _assert_matches_transformers(default_model_path, prompts, results)
    for status in transfer_variant_cluster.wait_idle():
        assert status.free_blocks == status.total_blocks, status
        assert status.pending_transfers == 0 and status.pool_ok, status
