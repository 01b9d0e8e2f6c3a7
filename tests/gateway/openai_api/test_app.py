"""The HTTP API over a real GenerationCore and fake workers: shapes, streaming, defaults."""

from __future__ import annotations

import asyncio

from tests.gateway.fakes import greedy
from tests.gateway.openai_api.harness import MAX_MODEL_LEN, MODEL, TOKENIZER, Harness, events

PROMPT = "The capital of France is"
PROMPT_IDS = TOKENIZER(PROMPT)["input_ids"]


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_completion_not_streamed() -> None:
    h = Harness()

    async def go():  # type: ignore[no-untyped-def]
        async with h.client() as c:
            return await c.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0},
                headers={"x-request-id": "abc"},
            )

    r = _run(go())
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "abc"
    body = r.json()
    assert body["id"] == "cmpl-abc" and body["object"] == "text_completion"
    assert body["model"] == MODEL and body["system_fingerprint"] == "pdserve-abc123"
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    expected = greedy(PROMPT_IDS, 5)
    assert choice["text"] == TOKENIZER.decode(expected, skip_special_tokens=True)
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    n = len(PROMPT_IDS)
    assert body["usage"] == {
        "prompt_tokens": n,
        "completion_tokens": 5,
        "total_tokens": n + 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert h.count("/v1/completions", 200) == 1
    assert h.lifecycle.in_flight == 0


def test_chat_not_streamed_and_the_served_names() -> None:
    h = Harness(prefill=False)

    async def go(model: str):  # type: ignore[no-untyped-def]
        async with h.client() as c:
            return await c.post(
                "/v1/chat/completions",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                    "max_completion_tokens": 3,
                    "seed": 7,
                    "user": "someone",
                    "store": False,
                },
            )

    for name in (MODEL, "tiny-chat", "tiny"):  # --model, its basename, --served-model-name
        r = _run(go(name))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
        assert body["model"] == name
        [choice] = body["choices"]
        assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 3
    assert h.decode.calls[0].seed == 7


def test_completion_streamed_with_usage() -> None:
    h = Harness()

    async def go():  # type: ignore[no-untyped-def]
        async with h.client() as c:
            return await c.post(
                "/v1/completions",
                json={
                    "prompt": PROMPT,
                    "max_tokens": 6,
                    "temperature": 0,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            )

    r = _run(go())
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = events(r.text)[:-1]
    *texts, usage = chunks
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    assert usage["usage"]["total_tokens"] == len(PROMPT_IDS) + 6
    assert all(c["usage"] is None for c in texts)
    assert all(c["object"] == "text_completion" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["finish_reason"] for c in texts][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in texts[:-1])
    text = "".join(c["choices"][0]["text"] for c in texts)
    assert text == TOKENIZER.decode(greedy(PROMPT_IDS, 6), skip_special_tokens=True)


def test_chat_streamed_starts_with_the_role_and_has_no_usage_unless_asked() -> None:
    h = Harness()

    async def go():  # type: ignore[no-untyped-def]
        async with h.client() as c:
            return await c.post(
                "/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": "hello"}],
                    "max_tokens": 4,
                    "stream": True,
                },
            )

    chunks = events(_run(go()).text)[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_max_tokens_defaults_to_the_rest_of_the_context_and_stop_strings() -> None:
    h = Harness(prefill=False)

    async def go(**extra: object):  # type: ignore[no-untyped-def]
        async with h.client() as c:
            r = await c.post("/v1/completions", json={"prompt": PROMPT, **extra})
            return r.json()

    body = _run(go(temperature=0))
    assert body["usage"]["completion_tokens"] == MAX_MODEL_LEN - len(PROMPT_IDS)
    full = TOKENIZER.decode(greedy(PROMPT_IDS, 20), skip_special_tokens=True)
    stop = full[5:7]
    body = _run(go(max_tokens=20, temperature=0, stop=stop, top_k=-1))
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == full[: full.index(stop)]


def test_models_health_tokenize_detokenize() -> None:
    h = Harness()

    async def go():  # type: ignore[no-untyped-def]
        async with h.client() as c:
            models = (await c.get("/v1/models")).json()
            health = await c.get("/health")
            tok = (await c.post("/tokenize", json={"prompt": PROMPT, "model": "tiny"})).json()
            detok = (await c.post("/detokenize", json={"tokens": tok["tokens"]})).json()
            msgs = [{"role": "user", "content": "hi"}]
            chat = (await c.post("/tokenize", json={"messages": msgs})).json()
            bare = await c.post(
                "/tokenize", json={"messages": msgs, "add_generation_prompt": False}
            )
            h.lifecycle.drain()
            drained = await c.get("/health")
            return models, health, tok, detok, chat, bare.json(), drained

    models, health, tok, detok, chat, bare, drained = _run(go())
    [card] = models["data"]
    assert models["object"] == "list"
    assert card["id"] == "tiny" and card["max_model_len"] == MAX_MODEL_LEN
    assert card["object"] == "model" and card["root"] == MODEL
    assert health.status_code == 200
    assert tok == {
        "count": len(PROMPT_IDS),
        "max_model_len": MAX_MODEL_LEN,
        "tokens": PROMPT_IDS,
        "token_strs": None,
    }
    assert detok == {"prompt": PROMPT}
    assert chat["count"] > bare["count"]  # the assistant turn's opening
    assert TOKENIZER.decode(chat["tokens"]).endswith("<|im_start|>assistant\n")
    assert drained.status_code == 503
