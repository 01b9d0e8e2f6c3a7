"""Log-probabilities over the HTTP API, streamed and not: completions' ``logprobs: N`` and
chat's ``logprobs: true`` + ``top_logprobs: N`` reach both tiers, and the fake workers' values
(tests/gateway/fakes.py: each token -0.25, its alternatives token+i at -0.25 - i) come back in
OpenAI's shapes, the first token's from the prefill worker's reply."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.gateway.fakes import greedy
from tests.gateway.openai_api.harness import TOKENIZER, Harness, events

PROMPT = "The capital of France is"
PROMPT_IDS = TOKENIZER(PROMPT)["input_ids"]
N = 5
WANT_IDS = greedy(PROMPT_IDS, N)


def _post(h: Harness, path: str, body: dict[str, Any]) -> Any:
    async def go():  # type: ignore[no-untyped-def]
        async with h.client() as c:
            return await c.post(path, json=body)

    return asyncio.run(go())


def _text(token_id: int) -> str:
    return TOKENIZER.decode([token_id])


def _completion(stream: bool, logprobs: int) -> tuple[Harness, list[dict[str, Any]]]:
    h = Harness()
    body = {"prompt": PROMPT, "max_tokens": N, "temperature": 0, "logprobs": logprobs}
    r = _post(h, "/v1/completions", {**body, "stream": stream})
    assert r.status_code == 200, r.text
    if not stream:
        return h, [r.json()["choices"][0]["logprobs"]]
    return h, [c["choices"][0]["logprobs"] for c in events(r.text)[:-1]]


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs(stream: bool) -> None:
    h, parts = _completion(stream, 2)
    assert h.decode.calls[-1].sampling.logprobs == 2  # type: ignore[union-attr]
    assert h.prefill.calls[-1].sampling.logprobs == 2  # type: ignore[union-attr]
    merged: dict[str, list[Any]] = {k: [] for k in parts[0]}
    for part in parts:
        assert set(part) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        for key, values in part.items():
            merged[key].extend(values)
    texts = [_text(t) for t in WANT_IDS]
    assert merged["tokens"] == texts
    assert merged["token_logprobs"] == [-0.25] * N
    for token, top in zip(WANT_IDS, merged["top_logprobs"], strict=True):
        want = {_text(token): -0.25}  # the chosen first; strings that decode alike collide,
        want.setdefault(_text(token + 1), -1.25)  # the likelier kept
        assert top == want
    offsets = [sum(len(t) for t in texts[:i]) for i in range(N)]
    assert merged["text_offset"] == offsets  # continues across the chunks of a stream


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs(stream: bool) -> None:
    h = Harness()
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": N,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
        "stream": stream,
    }
    r = _post(h, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert h.decode.calls[-1].sampling.logprobs == 3  # type: ignore[union-attr]
    if stream:
        chunks = events(r.text)[:-1]
        assert chunks[0]["choices"][0]["logprobs"] is None  # the role chunk
        content = [e for c in chunks[1:] for e in c["choices"][0]["logprobs"]["content"]]
    else:
        content = r.json()["choices"][0]["logprobs"]["content"]
    prompt = h.decode.calls[-1].prompt
    want = greedy(prompt, N)
    assert len(content) == N
    for token, entry in zip(want, content, strict=True):
        text = _text(token)
        assert entry["token"] == text and entry["logprob"] == -0.25
        assert entry["bytes"] == list(text.encode())
        tops = entry["top_logprobs"]
        assert [t["token"] for t in tops] == [_text(token + i) for i in range(3)]
        assert [t["logprob"] for t in tops] == [-0.25, -1.25, -2.25]
        assert tops[1]["bytes"] == list(_text(token + 1).encode())


def test_chat_logprobs_without_top_logprobs_has_no_alternatives() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": True}
    r = _post(Harness(), "/v1/chat/completions", {**body, "temperature": 0})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(e["top_logprobs"] == [] for e in content)


def test_completion_logprobs_zero_gives_the_chosen_token_only() -> None:
    _, parts = _completion(False, 0)
    assert parts[0]["top_logprobs"] == [{_text(t): -0.25} for t in WANT_IDS]


@pytest.mark.parametrize("stream", [False, True])
def test_no_logprobs_unless_asked(stream: bool) -> None:
    h = Harness()
    r = _post(
        h,
        "/v1/completions",
        {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": stream},
    )
    assert h.decode.calls[-1].sampling.logprobs is None  # type: ignore[union-attr]
    choices = [r.json()] if not stream else events(r.text)[:-1]
    assert all(c["choices"][0]["logprobs"] is None for c in choices)
    r = _post(h, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert r.json()["choices"][0]["logprobs"] is None


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": PROMPT, "logprobs": 21}, None),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ],
)
def test_out_of_range_is_400_naming_it(path: str, body: dict[str, Any], param: str | None) -> None:
    if path.endswith("chat/completions"):
        body = {"messages": [{"role": "user", "content": "x"}], **body}
    r = _post(Harness(), path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "logprobs must be in [0, 20]" in error["message"]
    if param is not None:
        assert error["param"] == param
