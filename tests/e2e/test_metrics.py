"""Each tier's /metrics, scraped after an end-to-end run, agrees with what the client saw."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pdserve.client import AsyncClient, Chunk
from pdserve.local_cluster import Cluster, free_port_range, start_cluster
from tests.e2e.prometheus import scrape
from tests.support.tiny_models import build_tiny_model

pytestmark = pytest.mark.e2e

PROMPTS = [[5, 6, 7, 8, 9], [11] * 30, [40, 41, 42]]
MAX_TOKENS = [6, 9, 4]


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, dict[str, int]]]:
    model = build_tiny_model(tmp_path_factory.mktemp("metrics-model"), "llama", 512, seed=3)
    base = free_port_range(3)
    cluster = start_cluster(
        str(model),
        prefill=1,
        decode=1,
        log_dir=tmp_path_factory.mktemp("metrics-logs"),
        extra=("--metrics-base-port", str(base)),
    )
    try:
        yield cluster, {"gateway": base, "prefill": base + 1, "decode": base + 2}
    finally:
        cluster.stop()


def test_counts_match_the_client(metered: tuple[Cluster, dict[str, int]], tmp_path: Path):
    cluster, ports = metered

    async def run() -> list[list[Chunk]]:
        async with AsyncClient(cluster.gateway) as client:
            streams = await asyncio.gather(
                *[
                    _collect(
                        client, prompt_token_ids=p, max_tokens=n, temperature=0.0, ignore_eos=True
                    )
                    for p, n in zip(PROMPTS, MAX_TOKENS, strict=True)
                ]
            )
            with pytest.raises(grpc.RpcError):
                await _collect(client, prompt="x", temperature=-1.0)
            return streams

    streams = asyncio.run(run())
    cluster.wait_idle()
    completion = sum(c[-1].completion_tokens for c in streams)
    prompt = sum(len(p) for p in PROMPTS)
    assert completion == sum(MAX_TOKENS)
    gw, pf, dc = (scrape(ports[t]) for t in ("gateway", "prefill", "decode"))

    assert gw[("pdserve_requests_total", (("code", "OK"),))] == len(PROMPTS)
    assert gw[("pdserve_requests_total", (("code", "INVALID_ARGUMENT"),))] == 1
    assert gw[("pdserve_time_to_first_token_seconds_count", ())] == len(PROMPTS)
    assert gw[("pdserve_inter_token_latency_seconds_count", ())] == completion - len(PROMPTS)
    assert gw[("pdserve_e2e_request_latency_seconds_count", ())] == len(PROMPTS) + 1
    assert gw[("pdserve_generation_tokens_total", ())] == completion
    assert gw[("pdserve_prompt_tokens_total", ())] == prompt
    assert gw[("pdserve_router_decisions_total", (("decision", "disaggregated"),))] == len(PROMPTS)
    # the prefill worker computed every prompt and sampled each first token ...
    assert pf[("pdserve_prompt_tokens_total", ())] == prompt
    assert pf[("pdserve_generation_tokens_total", ())] == len(PROMPTS)
    assert pf[("pdserve_request_prefill_time_seconds_count", ())] == len(PROMPTS)
    assert pf[("pdserve_kv_transfers_total", (("backend", "zmq"),))] == len(PROMPTS)
    # ... and the decode worker received the pages and sampled the rest
    assert dc[("pdserve_kv_transfers_total", (("backend", "zmq"),))] == len(PROMPTS)
    assert (
        dc[("pdserve_kv_transfer_bytes_total", (("backend", "zmq"),))]
        == pf[("pdserve_kv_transfer_bytes_total", (("backend", "zmq"),))]
        > 0
    )
    assert dc[("pdserve_generation_tokens_total", ())] == completion - len(PROMPTS)
    assert dc[("pdserve_request_decode_time_seconds_count", ())] == len(PROMPTS)
    for tier in (pf, dc):
        assert tier[("pdserve_num_requests_running", ())] == 0
        assert tier[("pdserve_kv_cache_usage_ratio", ())] == 0
        assert tier[("pdserve_gpu_available", ())] == 0


async def _collect(client: AsyncClient, **kwargs: object) -> list[Chunk]:
    return [chunk async for chunk in client.generate(**kwargs)]  # type: ignore[arg-type]
