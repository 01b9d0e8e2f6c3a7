"""``benchmarks/soak.py`` and ``benchmarks/overload.py`` run briefly against one real cluster (a
tiny model, 1 prefill + 1 decode worker, the HTTP API on, the gateway admitting 6 requests
and queueing none) and report every figure with no finding. Timing is not judged: the TTFT
bound gets seconds of slack, and the soak's drift floor (16 MB) is far above what a few
seconds move."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.overload import OverloadOptions, gateway_flags, run_overload
from benchmarks.soak import MIX, SoakOptions, prompt_vocab, run_soak
from pdserve.bench.datasets import LengthRange
from pdserve.local_cluster import Cluster, free_port_range, start_cluster
from tests.support.tiny_models import build_tiny_model

pytestmark = pytest.mark.e2e

MAX_CONCURRENT = 6
PROCESSES = {"launcher", "gateway", "prefill-0", "decode-0"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Path]]:
    root = tmp_path_factory.mktemp("overload-soak")
    model = build_tiny_model(root / "tiny-llama", "llama", vocab_size=512, seed=3)
    cluster = start_cluster(
        str(model),
        prefill=1,
        decode=1,
        log_dir=root,
        extra=gateway_flags(MAX_CONCURRENT, 0, 500),
        http_port=free_port_range(1),
    )
    try:
        yield cluster, model
    finally:
        cluster.stop()


def _as_json(report: dict[str, Any]) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(json.dumps(report))
    return loaded


def test_soak_samples_every_process_and_pool(served: tuple[Cluster, Path]) -> None:
    cluster, model = served
    opts = SoakOptions(minutes=0.05, clients=2, sample_s=0.5)
    report = _as_json(run_soak(cluster, prompt_vocab(model), str(model), opts))
    assert report["findings"] == [], report["findings"]
    assert len(report["samples"]) >= 4
    for sample in report["samples"]:
        assert set(sample["processes"]) == PROCESSES
        assert all(p["rss_mb"] > 0 and p["fds"] > 0 for p in sample["processes"].values())
        assert set(sample["pools"]) == {"prefill-0", "decode-0"}
    assert set(report["processes"]) == PROCESSES
    for figures in report["processes"].values():
        for key in ("rss_warm_mb", "rss_idle_end_mb", "drift_mb", "drift_mb_per_hour"):
            assert isinstance(figures[key], float), (key, figures)
    requests = report["requests"]
    assert set(requests["by_kind"]) == set(MIX)
    assert requests["by_outcome"].get("completed", 0) > 0
    assert requests["by_outcome"].get("cancelled", 0) > 0
    assert set(requests["by_outcome"]) <= {"completed", "cancelled", "expired"}
    for pool in report["pools_end"].values():
        assert pool["free_blocks"] == pool["total_blocks"] and pool["pool_ok"], pool


def test_overload_refuses_the_excess_with_retry_info(served: tuple[Cluster, Path]) -> None:
    cluster, model = served
    opts = OverloadOptions(
        max_concurrent=MAX_CONCURRENT,
        requests=18,
        input_len=LengthRange(8, 64),
        output_len=LengthRange(8, 8),
        ttft_slack_ms=5000.0,
        progress=False,
    )
    report = _as_json(run_overload(cluster, prompt_vocab(model), opts))
    assert report["findings"] == [], report["findings"]
    capacity, over = report["capacity"], report["overload"]
    assert capacity["admitted"] == capacity["complete"] == 18 and capacity["refused"] == 0
    assert capacity["request_throughput"] > 0 and capacity["ttft"]["p99_ms"] > 0
    assert over["offered"] == 90 and over["refused"] > 0
    assert over["admitted"] == over["complete"] == over["offered"] - over["refused"]
    assert over["refusal_codes"] == {"RESOURCE_EXHAUSTED": over["refused"]}
    assert over["retry_after_s"] == {"min": 0.5, "max": 0.5}
    assert report["ttft_ratio"]["p50_ms"] > 0 and report["ttft_ratio"]["p99_ms"] > 0
    assert all(p["idle"] for p in report["pools"]), report["pools"]
