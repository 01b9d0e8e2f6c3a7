"""End to end, disaggregated (the prefill tier samples the first token, the decode tier the
rest): greedy output with repetition_penalty and min_tokens equals transformers' ``generate``
with the same processors, and a sampled request's seed comes back and reproduces it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pdserve.client import AsyncClient, Chunk
from pdserve.local_cluster import Cluster
from tests.e2e import reference

pytestmark = pytest.mark.e2e

PROMPT = "List three primary colors: red, blue and"
MAX_TOKENS = 30
MIN_TOKENS = 12


async def _collect(cluster: Cluster, **kwargs: object) -> list[Chunk]:
    async with AsyncClient(cluster.gateway) as client:
        return [chunk async for chunk in client.generate(timeout=300, **kwargs)]  # type: ignore[arg-type]


def _tokens(chunks: list[Chunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


@pytest.mark.parametrize("default_cluster", ["disaggregated"], indirect=True)
def test_repetition_penalty_and_min_tokens_match_transformers(
    default_cluster: Cluster, default_model_path: Path
) -> None:
    prompt_ids = reference.tokenizer(str(default_model_path))(PROMPT)["input_ids"]
    penalized = reference.greedy(default_model_path, prompt_ids, MAX_TOKENS, repetition_penalty=1.3)
    assert penalized != reference.greedy(default_model_path, prompt_ids, MAX_TOKENS)
    stop_at = penalized[2]  # a stop token greedy reaches early: masked until MIN_TOKENS exist
    want = reference.greedy(
        default_model_path,
        prompt_ids,
        MAX_TOKENS,
        stop_token_ids=(stop_at,),
        repetition_penalty=1.3,
        min_new_tokens=MIN_TOKENS,
    )
    assert len(want) >= MIN_TOKENS and stop_at not in want[:MIN_TOKENS]

    plain = asyncio.run(
        _collect(
            default_cluster,
            prompt=PROMPT,
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            repetition_penalty=1.3,
        )
    )
    assert _tokens(plain) == penalized
    chunks = asyncio.run(
        _collect(
            default_cluster,
            prompt=PROMPT,
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            repetition_penalty=1.3,
            min_tokens=MIN_TOKENS,
            stop_token_ids=[stop_at],
        )
    )
    assert _tokens(chunks) == want
    assert chunks[-1].finish_reason == ("length" if len(want) == MAX_TOKENS else "stop")
    assert all(c.seed is None for c in chunks)  # greedy: no seed in play


@pytest.mark.parametrize("default_cluster", ["disaggregated"], indirect=True)
def test_the_assigned_seed_comes_back_and_reproduces_the_output(default_cluster: Cluster) -> None:
    options = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0.9, "presence_penalty": 0.5}
    first = asyncio.run(_collect(default_cluster, **options))
    seed = first[0].seed
    assert seed is not None and all(c.seed is None for c in first[1:])
    again = asyncio.run(_collect(default_cluster, **options, seed=seed))
    assert _tokens(again) == _tokens(first) and again[0].seed == seed
