"""End to end over real processes on loopback: pdserve's greedy output must be token-identical
to transformers' ``generate``, streams well-formed, and every KV block back afterwards."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from pdserve.client import AsyncClient, Chunk
from pdserve.local_cluster import Cluster
from tests.e2e import reference

pytestmark = pytest.mark.e2e

DEFAULT_PROMPTS = [
    ("The capital of France is", 12),
    ("Once upon a time, in a small village by the sea, there lived an old fisherman who", 40),
    ('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n', 24),
    (" ".join(["Paris is the capital of France."] * 24) + " Berlin is the capital of", 16),
    ("List three primary colors:", 30),
]


async def _collect(client: AsyncClient, **kwargs: object) -> list[Chunk]:
    return [chunk async for chunk in client.generate(**kwargs)]


def _check_stream(chunks: list[Chunk], prompt_len: int, max_tokens: int) -> list[int]:
    """Order and bookkeeping of one stream; returns its token ids."""
    assert chunks, "empty stream"
    assert all(c.finish_reason is None for c in chunks[:-1]), "finish_reason before the end"
    last = chunks[-1]
    assert last.finish_reason in ("stop", "length")
    tokens = [t for c in chunks for t in c.token_ids]
    assert last.prompt_tokens == prompt_len
    assert last.completion_tokens == len(tokens)
    assert (last.finish_reason == "length") == (len(tokens) == max_tokens)
    assert len({c.request_id for c in chunks}) == 1
    return tokens


async def _run_concurrently(cluster: Cluster, prompts: list[tuple[str, int]]) -> list[list[Chunk]]:
    async with AsyncClient(cluster.gateway) as client:
        return await asyncio.gather(
            *[
                _collect(client, prompt=p, max_tokens=n, temperature=0.0, timeout=300)
                for p, n in prompts
            ]
        )


def _assert_matches_transformers(
    model_path: Path, prompts: list[tuple[str, int]], results: list[list[Chunk]]
) -> None:
    tok = reference.tokenizer(str(model_path))
    for (prompt, max_tokens), chunks in zip(prompts, results, strict=True):
        prompt_ids = tok(prompt)["input_ids"]
        tokens = _check_stream(chunks, len(prompt_ids), max_tokens)
        expected = reference.greedy(model_path, prompt_ids, max_tokens)
        assert tokens == expected, f"prompt {prompt[:40]!r}"
        text = "".join(c.text for c in chunks)
        assert text == tok.decode(tokens, skip_special_tokens=True)


def test_default_model_matches_transformers(default_cluster: Cluster, default_model_path: Path):
    results = asyncio.run(_run_concurrently(default_cluster, DEFAULT_PROMPTS))
    _assert_matches_transformers(default_model_path, DEFAULT_PROMPTS, results)
    for status in default_cluster.wait_idle():
        assert status.free_blocks == status.total_blocks, status
        assert status.pending_transfers == 0 and status.pool_ok, status


def test_default_model_chat_messages(default_cluster: Cluster, default_model_path: Path):
    async def run() -> list[Chunk]:
        async with AsyncClient(default_cluster.gateway) as client:
            return await _collect(
                client,
                messages=[("user", "What is the capital of France?")],
                max_tokens=12,
                temperature=0.0,
            )

    chunks = asyncio.run(run())
    tok = reference.tokenizer(str(default_model_path))
    prompt_ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    tokens = _check_stream(chunks, len(prompt_ids), 12)
    assert tokens == reference.greedy(default_model_path, list(prompt_ids), 12)


TINY_PROMPTS = [
    ("hello world", 20),
    ("The quick brown fox jumps over the lazy dog " * 6, 12),
    ("日本語 é ü ☃ 🙂", 16),
]


def test_tiny_models_match_transformers(tiny_cluster: tuple[Path, Cluster]):
    path, cluster = tiny_cluster
    results = asyncio.run(_run_concurrently(cluster, TINY_PROMPTS))
    _assert_matches_transformers(path, TINY_PROMPTS, results)
    for status in cluster.wait_idle():
        assert status.free_blocks == status.total_blocks, status


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "no input"),
        ({"prompt": "hi", "prompt_token_ids": [1, 2]}, "exactly one input"),
        ({"prompt": ""}, "empty"),
        ({"prompt": "hi", "max_tokens": 10**6}, "max_tokens"),
        ({"prompt": "hi", "temperature": -0.5}, "temperature"),
        ({"prompt": "hi", "top_p": 0.0}, "top_p"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"messages": [("wizard", "hi")]}, "role"),
        ({"prompt_token_ids": [1, 10**9]}, "vocab"),
    ],
    ids=[
        "no-input",
        "two-inputs",
        "empty-prompt",
        "max-tokens",
        "temperature",
        "top-p-zero",
        "top-p-high",
        "unknown-role",
        "token-out-of-vocab",
    ],
)
def test_invalid_argument(default_cluster: Cluster, kwargs: dict[str, object], message: str):
    async def run() -> None:
        async with AsyncClient(default_cluster.gateway) as client:
            await _collect(client, **kwargs)

    with pytest.raises(grpc.RpcError) as info:
        asyncio.run(run())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details().lower(), info.value.details()


def test_cancel_and_deadline_free_every_block(default_cluster: Cluster):
    long_request = {
        "prompt": "Tell me a long story about dragons.",
        "max_tokens": 400,
        "temperature": 0.0,
        "ignore_eos": True,
    }

    async def cancel_after_first_token() -> None:
        async with AsyncClient(default_cluster.gateway) as client:
            async for _ in client.generate(**long_request):
                break  # leaving the loop cancels the call

    async def deadline() -> None:
        async with AsyncClient(default_cluster.gateway) as client:
            await _collect(client, timeout=1.5, **long_request)

    asyncio.run(cancel_after_first_token())
    with pytest.raises(grpc.RpcError) as info:
        asyncio.run(deadline())
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for status in default_cluster.wait_idle():
        assert status.free_blocks == status.total_blocks, status
        assert status.running == 0 and status.waiting == 0, status


def test_stop_string_and_stop_token(default_cluster: Cluster, default_model_path: Path):
    async def run(**kwargs: object) -> list[Chunk]:
        async with AsyncClient(default_cluster.gateway) as client:
            return await _collect(
                client, prompt="The capital of France is", temperature=0.0, max_tokens=12, **kwargs
            )

    chunks = asyncio.run(run(stop=["."]))
    assert chunks[-1].finish_reason == "stop"
    assert "".join(c.text for c in chunks) == " Paris"
    tok = reference.tokenizer(str(default_model_path))
    paris = tok(" Paris")["input_ids"][-1]
    chunks = asyncio.run(run(stop_token_ids=[paris]))
    assert chunks[-1].finish_reason == "stop"
    assert [t for c in chunks for t in c.token_ids] == [paris]
