"""``pdserve bench`` as a user runs it: a subprocess against a real cluster on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdserve.local_cluster import Cluster, start_cluster
from tests.support.tiny_models import build_tiny_model

pytestmark = pytest.mark.e2e

LATENCY_KEYS = [
    f"{stat}_{metric}_ms"
    for metric in ("ttft", "tpot", "itl", "e2el")
    for stat in ("mean", "median", "std", "p50", "p90", "p99")
]
RUN_KEYS = [
    "num_requests",
    "completed",
    "failed",
    "completion_rate",
    "duration",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput",
    "slo_attainment",
    "output_throughput",
    "total_token_throughput",
    "max_output_tokens_per_s",
    "max_concurrent_requests",
    "input_lens",
    "output_lens",
    "ttfts",
    "itls",
    *LATENCY_KEYS,
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("bench-model") / "llama", "llama", 512)


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("bench-logs")
    c = start_cluster(str(tiny_model), prefill=1, decode=1, log_dir=logs)
    try:
        yield c
    finally:
        c.stop()


def _bench(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "bench", "--disable-tqdm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _load(path: Path) -> dict[str, object]:
    def refuse(name: str) -> None:
        raise ValueError(f"not strict JSON: {name}")

    doc: dict[str, object] = json.loads(path.read_text(), parse_constant=refuse)
    return doc


def _check_run(run: dict[str, object], requests: int) -> None:
    missing = [k for k in RUN_KEYS if k not in run]
    assert not missing, missing
    assert run["completion_rate"] == 1.0 and run["completed"] == requests
    lens = run["output_lens"]
    assert isinstance(lens, list) and all(isinstance(n, int) and n > 0 for n in lens)


def test_smoke_against_a_gateway(cluster: Cluster, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = _bench(
        "--gateway",
        cluster.gateway,
        "--model",
        str(tiny_model),
        "--smoke",
        "--goodput",
        "ttft:60000",
        "tpot:60000",
        "--output-json",
        str(out),
        "--plot-dir",
        str(tmp_path / "plots"),
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "out tok/s" in result.stdout
    doc = _load(out)
    runs = doc["runs"]
    assert isinstance(runs, list) and len(runs) == 1
    _check_run(runs[0], requests=4)
    assert runs[0]["request_goodput"] == pytest.approx(runs[0]["request_throughput"])
    # ignore_eos + max_tokens: every request produced exactly its target length
    assert sum(runs[0]["output_lens"]) == runs[0]["total_output_tokens"]
    assert len(list((tmp_path / "plots").glob("*.png"))) == 3
    assert cluster.wait_idle()  # the bench leaves nothing behind on the workers


def test_smoke_compare(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    result = _bench(
        "--compare",
        "--model",
        str(tiny_model),
        "--smoke",
        "--output-json",
        str(out),
        "--log-dir",
        str(tmp_path / "logs"),
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    doc = _load(out)
    runs = doc["runs"]
    assert isinstance(runs, list)
    labels = [r["label"] for r in runs]
    assert labels == [
        "hf-serial",
        "hf-static8",
        "hf-cb",
        "pdserve-colocated",
        "pdserve-disaggregated",
    ]
    for run in runs:
        _check_run(run, requests=4)
    # the same requests went through every system
    assert len({tuple(r["input_lens"]) for r in runs}) == 1
    assert len({tuple(r["output_lens"]) for r in runs}) == 1
    ratios = doc["ratios"]
    assert isinstance(ratios, dict)
    assert set(ratios["pdserve-colocated"]) == {"hf-serial", "hf-static8", "hf-cb"}
    assert set(ratios["pdserve-disaggregated"]) == {
        "hf-serial",
        "hf-static8",
        "hf-cb",
        "pdserve-colocated",
    }
    assert "output tok/s =" in result.stdout
