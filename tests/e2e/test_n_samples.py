"""``n`` samples, ``echo`` and cached prompt tokens end to end, in both modes, with the official
``openai`` client and the SDK: seeded samples are reproducible and sample ``i`` equals an
``n=1`` request seeded ``seed + i``; greedy samples equal the greedy output; siblings find the
prompt's blocks in the prefix cache (their ``cached_tokens``), a repeated prompt reports its
cached tokens, ``echo`` returns the prompt, and abandoning ``n`` streams frees every block."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from pdserve.client import AsyncClient, Chunk
from pdserve.local_cluster import Cluster
from tests.e2e import reference

pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time, in a small village by the sea,"
LONG = " ".join(["The quick brown fox jumps over the lazy dog."] * 8) + " Then the fox"


@pytest.fixture
def client(default_cluster: Cluster) -> Iterator[openai.OpenAI]:
    assert default_cluster.http is not None
    with openai.OpenAI(base_url=f"{default_cluster.http}/v1", api_key="unused", max_retries=0) as c:
        yield c


def _texts(client: openai.OpenAI, model: str, **kwargs: object) -> list[str]:
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, **kwargs)  # type: ignore[call-overload]
    assert [c.index for c in reply.choices] == list(range(len(reply.choices)))
    return [c.text for c in reply.choices]


def test_seeded_samples_are_reproducible_and_sample_i_is_seed_plus_i(
    client: openai.OpenAI, default_model_path: Path
) -> None:
    model = str(default_model_path)
    sampled = {"temperature": 1.0, "seed": 1234}
    three = _texts(client, model, n=3, **sampled)
    assert _texts(client, model, n=3, **sampled) == three
    assert len(set(three)) > 1  # different seeds, different samples
    for i in (1, 2):
        assert _texts(client, model, temperature=1.0, seed=1234 + i) == [three[i]]
    greedy = _texts(client, model, temperature=0)
    assert _texts(client, model, n=2, temperature=0) == greedy * 2
    ids = reference.tokenizer(model)(PROMPT)["input_ids"]
    want = reference.tokenizer(model).decode(reference.greedy(default_model_path, ids, 8))
    assert greedy == [want]


def test_siblings_and_a_repeated_prompt_hit_the_prefix_cache(
    client: openai.OpenAI, default_cluster: Cluster, default_model_path: Path
) -> None:
    block = default_cluster.status_of(default_cluster.decode[0]).block_size
    prompt_len = len(reference.tokenizer(str(default_model_path))(LONG)["input_ids"])
    full = (prompt_len - 1) // block * block

    async def samples() -> list[Chunk]:
        async with AsyncClient(default_cluster.gateway) as c:
            gen = c.generate(LONG, n=3, max_tokens=4, temperature=0.7, timeout=120)
            return [chunk async for chunk in gen]

    chunks = asyncio.run(samples())
    lasts = {c.index: c for c in chunks if c.finish_reason is not None}
    assert sorted(lasts) == [0, 1, 2]
    firsts = {c.index: c.seed for c in reversed(chunks) if c.seed is not None}
    assert firsts[1] == firsts[0] + 1 and firsts[2] == firsts[0] + 2  # type: ignore[operator]
    assert all(lasts[i].cached_tokens == full for i in (1, 2)), lasts  # shared, not recomputed
    again = client.completions.create(
        model=str(default_model_path), prompt=LONG, max_tokens=2, temperature=0
    )
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == full > 0
    for status in default_cluster.wait_idle():
        assert status.free_blocks == status.total_blocks, status


def test_echo_returns_the_prompt(client: openai.OpenAI, default_model_path: Path) -> None:
    model = str(default_model_path)
    plain = _texts(client, model, temperature=0)
    assert _texts(client, model, temperature=0, echo=True) == [PROMPT + plain[0]]
    stream = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, echo=True, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].text.startswith(PROMPT)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == PROMPT + plain[0]


def test_abandoned_samples_free_every_block(default_cluster: Cluster) -> None:
    async def leave_early() -> None:
        async with AsyncClient(default_cluster.gateway) as c:
            seen: set[int] = set()
            gen = c.generate(LONG, n=4, max_tokens=300, ignore_eos=True, temperature=0.7)
            async for chunk in gen:
                seen.add(chunk.index)
                if len(seen) == 4:
                    break  # leaving the loop cancels every sample

    asyncio.run(leave_early())
    for status in default_cluster.wait_idle():
        assert status.free_blocks == status.total_blocks, status
        assert status.running == 0 and status.waiting == 0, status
