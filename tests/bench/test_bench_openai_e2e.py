"""``pdserve bench --backend openai`` against a real cluster's HTTP API, beside the gRPC run of the
same requests: the same greedy requests give the same token counts on both paths."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pdserve.bench.datasets import BenchRequest
from pdserve.bench.load import LoadSpec
from pdserve.bench.openai_http import OpenAITarget, bench_openai_async
from pdserve.bench.runner import RunSettings
from pdserve.local_cluster import Cluster, free_port_range, start_cluster
from tests.support.tiny_models import build_tiny_model

pytestmark = pytest.mark.e2e

ARGS = ("--num-prompts", "3", "--input-len-range", "8,24", "--output-len-range", "4,8")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("bench-http-model") / "llama", "llama", 512)


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("bench-http-logs")
    c = start_cluster(
        str(tiny_model), prefill=1, decode=1, log_dir=logs, http_port=free_port_range(1)
    )
    try:
        yield c
    finally:
        c.stop()


def _bench(out: Path, *args: str) -> dict[str, Any]:
    argv = [sys.executable, "-m", "pdserve.cli", "bench", "--disable-tqdm", *ARGS, *args]
    result = subprocess.run(
        [*argv, "--output-json", str(out)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "out tok/s" in result.stdout
    runs = json.loads(out.read_text())["runs"]
    assert isinstance(runs, list) and len(runs) == 1
    run: dict[str, Any] = runs[0]
    return run


def test_openai_backend_matches_the_grpc_run(
    cluster: Cluster, tiny_model: Path, tmp_path: Path
) -> None:
    assert cluster.http is not None
    model = ("--model", str(tiny_model))
    grpc_run = _bench(tmp_path / "grpc.json", "--gateway", cluster.gateway, *model)
    http_run = _bench(
        tmp_path / "http.json", "--backend", "openai", "--base-url", f"{cluster.http}/v1", *model
    )
    for run in (grpc_run, http_run):
        assert run["completed"] == 3 and run["failed"] == 0, run["errors"]
        assert run["mean_ttft_ms"] > 0 and run["mean_e2el_ms"] >= run["mean_ttft_ms"]
    assert http_run["label"] == "openai" and "/v1/completions" in http_run["description"]
    assert http_run["input_lens"] == grpc_run["input_lens"]
    assert http_run["output_lens"] == grpc_run["output_lens"]  # from usage.completion_tokens
    assert http_run["total_output_tokens"] == grpc_run["total_output_tokens"]
    assert all(len(itl) >= 1 for itl in http_run["itls"])
    assert cluster.wait_idle()


def test_chat_endpoint_in_process(cluster: Cluster) -> None:
    assert cluster.http is not None
    target = OpenAITarget(f"{cluster.http}/v1", "chat")
    requests = [BenchRequest((1,), 5), BenchRequest((2,), 3)]
    settings = RunSettings(slos_ms={}, timeout_s=60, disable_progress=True)
    outcomes, _, model = asyncio.run(
        bench_openai_async(
            target, requests, LoadSpec(math.inf), settings, prompt_texts=["Hello", "Bonjour"]
        )
    )
    assert model  # asked GET /v1/models
    assert [o.error for o in outcomes] == ["", ""]
    assert [o.output_tokens for o in outcomes] == [5, 3]  # ignore_eos + max_completion_tokens
    assert all(o.prompt_len > 1 for o in outcomes)  # the server's count: the chat template's
