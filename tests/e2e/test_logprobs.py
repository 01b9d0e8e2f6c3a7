"""Log-probabilities end to end, in both modes (disaggregated: the prefill tier computes the
first token's, which reaches the gateway in the prefill worker's reply): over the HTTP API with
the official ``openai`` client (completions, chat streamed) and over gRPC with the SDK, every
token's logprob and top alternatives equal transformers' ``log_softmax`` of ``generate``'s
logits (float32) within 1e-4."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch

from pdserve.client import AsyncClient, Chunk
from pdserve.local_cluster import Cluster
from tests.e2e import reference

pytestmark = pytest.mark.e2e

PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 8
TOL = 1e-4


@pytest.fixture
def client(default_cluster: Cluster) -> Iterator[openai.OpenAI]:
    assert default_cluster.http is not None
    with openai.OpenAI(base_url=f"{default_cluster.http}/v1", api_key="unused", max_retries=0) as c:
        yield c


def _string(path: Path, token_id: int) -> str:
    return reference.tokenizer(str(path)).decode([token_id])


def _check_top(path: Path, ref: torch.Tensor, got: dict[str, float], n: int) -> None:
    """``got`` (token string -> logprob) holds transformers' ``n`` likeliest tokens."""
    values, ids = torch.topk(ref, n)
    for token_id, value in zip(ids.tolist(), values.tolist(), strict=True):
        text = _string(path, token_id)
        assert text in got, (text, got)
        assert abs(got[text] - value) < TOL, (text, got[text], value)


def test_completion_logprobs_match_transformers(
    client: openai.OpenAI, default_model_path: Path
) -> None:
    ids = reference.tokenizer(str(default_model_path))(PROMPT)["input_ids"]
    tokens, want = reference.greedy_logprobs(default_model_path, ids, MAX_TOKENS)
    whole = client.completions.create(
        model=str(default_model_path),
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=5,
    )
    lp = whole.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert lp.top_logprobs is not None and lp.text_offset is not None
    assert lp.tokens == [_string(default_model_path, t) for t in tokens]
    assert len(lp.token_logprobs) == len(tokens) == MAX_TOKENS
    for step, token in enumerate(tokens):  # step 0: sampled on the prefill tier when split
        assert abs(lp.token_logprobs[step] - float(want[step][token])) < TOL, step
        _check_top(default_model_path, want[step], lp.top_logprobs[step], 5)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(tokens))]


def test_streamed_chat_logprobs_match_transformers(
    client: openai.OpenAI, default_model_path: Path
) -> None:
    tok = reference.tokenizer(str(default_model_path))
    ids = list(
        tok.apply_chat_template(
            QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )
    tokens, want = reference.greedy_logprobs(default_model_path, ids, MAX_TOKENS)
    stream = client.chat.completions.create(
        model=str(default_model_path),
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    )
    content = [
        entry
        for chunk in stream
        if chunk.choices and chunk.choices[0].logprobs is not None
        for entry in chunk.choices[0].logprobs.content or []
    ]
    assert len(content) == len(tokens)
    for step, (entry, token) in enumerate(zip(content, tokens, strict=True)):
        text = _string(default_model_path, token)
        assert entry.token == text and entry.bytes == list(text.encode())
        assert abs(entry.logprob - float(want[step][token])) < TOL, step
        assert len(entry.top_logprobs) == 3
        _check_top(
            default_model_path, want[step], {t.token: t.logprob for t in entry.top_logprobs}, 3
        )


def test_grpc_sdk_logprobs_match_transformers(
    default_cluster: Cluster, default_model_path: Path
) -> None:
    async def collect() -> list[Chunk]:
        async with AsyncClient(default_cluster.gateway) as c:
            gen = c.generate(PROMPT, max_tokens=MAX_TOKENS, temperature=0, logprobs=2, timeout=300)
            return [chunk async for chunk in gen]

    chunks = asyncio.run(collect())
    ids = reference.tokenizer(str(default_model_path))(PROMPT)["input_ids"]
    tokens, want = reference.greedy_logprobs(default_model_path, ids, MAX_TOKENS)
    assert chunks[0].token_ids and len(chunks[0].logprobs) == len(chunks[0].token_ids)
    lps = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token_id for lp in lps] == [t for c in chunks for t in c.token_ids] == tokens
    for step, lp in enumerate(lps):
        assert abs(lp.logprob - float(want[step][lp.token_id])) < TOL, step
        values, top_ids = torch.topk(want[step], 2)
        assert [t for t, _ in lp.top] == top_ids.tolist()
        for (_, got), value in zip(lp.top, values.tolist(), strict=True):
            assert abs(got - value) < TOL
