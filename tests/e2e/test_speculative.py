"""End to end with n-gram speculative decoding (``--speculative ngram``), colocated and
disaggregated: greedy output stays token-identical to transformers' ``generate`` while drafts
are verified (the decode worker's /metrics show tokens proposed and accepted), and seeded
sampled output is exactly what the same requests give without speculation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from pdserve.client import AsyncClient, Chunk, RequestOptions
from pdserve.local_cluster import Cluster, free_port_range, start_cluster
from tests.e2e import reference
from tests.e2e.prometheus import Samples, sample, scrape

pytestmark = [
    pytest.mark.e2e,
    # every test takes the shared plain colocated cluster (the seeded test's ``off`` side), so
    # that pytest keeps each mode's tests together and starts each spec_cluster once
    pytest.mark.usefixtures("default_cluster"),
    pytest.mark.parametrize("default_cluster", ["colocated"], indirect=True, ids=["off-colocated"]),
]

PARAGRAPH = (
    "The old lighthouse stood at the edge of the cliff for more than a century. Every night "
    "its keeper climbed the narrow stairs, trimmed the wick and polished the great lens, so "
    "that ships passing through the storm could find their way home. When the keeper grew "
    "old, his daughter took the lamp, and the light never once failed the sailors below."
)
FUNCTION = (
    "def total_price(items, tax_rate):\n"
    "    subtotal = 0\n"
    "    for item in items:\n"
    "        subtotal += item.price * item.quantity\n"
    "    tax = subtotal * tax_rate\n"
    "    return subtotal + tax\n"
)
GROUNDED = [
    f"Repeat the following text exactly:\n\n{PARAGRAPH}",
    f"Rewrite this function renaming `subtotal` to `net`:\n\n```python\n{FUNCTION}```",
]
UNGROUNDED = "Write a short poem about autumn leaves."
PROMPTS = [*GROUNDED, UNGROUNDED]
MAX_TOKENS = 56

SAMPLED = list(zip(PROMPTS, (11, 23, 37), strict=True))  # (prompt, seed)
SAMPLING: RequestOptions = {"temperature": 0.8, "top_p": 0.95}

SPEC_COUNTERS = (
    "pdserve_spec_proposed_tokens_total",
    "pdserve_spec_accepted_tokens_total",
    "pdserve_spec_verify_steps_total",
)


class SpecCluster(NamedTuple):
    cluster: Cluster
    metrics_port: int
    """The decode worker's /metrics (where drafts are verified)."""


class Spec(NamedTuple):
    """What speculation did on the decode worker between two scrapes."""

    proposed: float
    accepted: float
    verify_steps: float


@pytest.fixture(
    scope="module", params=["colocated", "disaggregated"], ids=lambda mode: f"ngram-{mode}"
)
def spec_cluster(
    request: pytest.FixtureRequest, default_model_path: Path, cluster_logs: Path
) -> Iterator[SpecCluster]:
    prefill = 0 if request.param == "colocated" else 1
    base = free_port_range(prefill + 3)  # gateway, workers, the launcher
    cluster = start_cluster(
        str(default_model_path),
        prefill=prefill,
        decode=1,
        log_dir=cluster_logs,
        extra=("--speculative", "ngram", "--metrics-base-port", str(base)),
    )
    try:
        # metrics ports: the gateway's, then the prefill workers', then the decode worker's
        yield SpecCluster(cluster, base + 1 + prefill)
    finally:
        cluster.stop()


def _chat_ids(model_path: Path, prompt: str) -> list[int]:
    tok = reference.tokenizer(str(model_path))
    encoded: Any = tok.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    return list(encoded["input_ids"])


@cache
def _expected(model_path: Path, prompt: str) -> list[int]:
    return reference.greedy(model_path, _chat_ids(model_path, prompt), MAX_TOKENS)


def _chat(prompt: str, sampling: RequestOptions) -> RequestOptions:
    return {**sampling, "messages": [("user", prompt)], "max_tokens": MAX_TOKENS}


async def _collect(client: AsyncClient, options: RequestOptions) -> list[Chunk]:
    return [chunk async for chunk in client.generate(timeout=300, **options)]


def _run_all(cluster: Cluster, requests: list[RequestOptions]) -> list[list[int]]:
    """Every request at once (one batch); each one's token ids."""

    async def run() -> list[list[Chunk]]:
        async with AsyncClient(cluster.gateway) as client:
            return await asyncio.gather(*[_collect(client, o) for o in requests])

    return [[t for c in chunks for t in c.token_ids] for chunks in asyncio.run(run())]


def _spec_delta(before: Samples, after: Samples) -> Spec:
    proposed, accepted, steps = (sample(after, n) - sample(before, n) for n in SPEC_COUNTERS)
    return Spec(proposed, accepted, steps)


def _assert_same(got: list[int], want: list[int], what: str, spec: Spec, cluster: Cluster) -> None:
    first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    assert got == want, (
        f"{what} (first difference at token {first}):\n got {got}\nwant {want}\n"
        f"speculation: {spec}\n{cluster.logs()[-4000:]}"
    )


def _assert_idle(cluster: Cluster) -> None:
    for status in cluster.wait_idle():
        assert status.free_blocks == status.total_blocks, status
        assert status.pending_transfers == 0 and status.pool_ok, status


def test_greedy_matches_transformers_while_speculating(
    spec_cluster: SpecCluster, default_model_path: Path
) -> None:
    cluster, port = spec_cluster
    before = scrape(port)
    got = _run_all(cluster, [_chat(p, {"temperature": 0.0}) for p in PROMPTS])
    cluster.wait_idle()
    spec = _spec_delta(before, scrape(port))
    for prompt, tokens in zip(PROMPTS, got, strict=True):
        what = f"speculative greedy output differs from transformers for {prompt[:40]!r}"
        _assert_same(tokens, _expected(default_model_path, prompt), what, spec, cluster)
    # the identity above held while drafts were really being verified
    assert spec.accepted > 0, f"no draft token accepted on grounded prompts: {spec}"
    assert spec.proposed >= spec.accepted, spec
    assert spec.verify_steps > 0, spec
    print(f"speculation (greedy): {spec}, acceptance {spec.accepted / spec.proposed:.2f}")
    _assert_idle(cluster)


def test_seeded_sampling_is_unchanged_by_speculation(
    spec_cluster: SpecCluster, default_cluster: Cluster, default_model_path: Path
) -> None:
    """``default_cluster`` (shared with the other e2e tests) runs without speculation."""
    requests = [_chat(p, {**SAMPLING, "seed": seed}) for p, seed in SAMPLED]
    cluster, port = spec_cluster
    before = scrape(port)
    got = _run_all(cluster, requests)
    cluster.wait_idle()
    spec = _spec_delta(before, scrape(port))
    want = _run_all(default_cluster, requests)
    for (prompt, seed), tokens, expected in zip(SAMPLED, got, want, strict=True):
        what = f"seed {seed} with --speculative ngram differs from off for {prompt[:40]!r}"
        _assert_same(tokens, expected, what, spec, cluster)
    greedy = [_expected(default_model_path, p) for p, _ in SAMPLED]
    assert got != greedy, "the seeded requests decoded greedily: nothing was sampled"
    assert spec.accepted > 0, f"no draft token accepted on seeded grounded prompts: {spec}"
    assert spec.proposed >= spec.accepted, spec
    print(f"speculation (seeded): {spec}, acceptance {spec.accepted / spec.proposed:.2f}")
    _assert_idle(cluster)
