"""``n`` choices, ``echo`` and ``prompt_tokens_details.cached_tokens`` over the HTTP API (fake
workers), and the same over the gRPC servicer: indexes, one finish per choice, usage counting
the prompt once, the base seed in ``x-pdserve-seed``, the prompt echoed before each choice."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from core.errors import InvalidRequestError
from core.sampling import SamplingParams
from gateway.openai_api.serving import SEED_HEADER
from gateway.servicer import GenerationServicer
from protos.pdserve.v1 import generation_pb2
from server_runtime.grpc_runtime import Lifecycle, Refused
from tests.gateway.fakes import BLOCK, greedy
from tests.gateway.openai_api.harness import TOKENIZER, Harness, events

PROMPT = "The capital of France is"
PROMPT_IDS = TOKENIZER(PROMPT)["input_ids"]
LONG = "a fairly long prompt that spans a few blocks of sixteen tokens each " * 2
CHAT = [{"role": "user", "content": "hello"}]


def _post(h: Harness, path: str, body: dict[str, Any]) -> Any:
    async def go():  # type: ignore[no-untyped-def]
        async with h.client() as c:
            return await c.post(path, json=body)

    return asyncio.run(go())


def _text(ids: list[int]) -> str:
    return TOKENIZER.decode(ids, skip_special_tokens=True)


def test_n_choices_not_streamed_with_seeds_base_plus_i() -> None:
    h = Harness()
    body = {"prompt": PROMPT, "max_tokens": 5, "n": 3, "seed": 40, "temperature": 0.8}
    r = _post(h, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert r.headers[SEED_HEADER] == "40"  # the base seed
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    for i, choice in enumerate(choices):
        want = greedy(PROMPT_IDS, 5, SamplingParams(temperature=0.8, seed=40 + i))
        assert choice["text"] == _text(want) and choice["finish_reason"] == "length"
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == len(PROMPT_IDS)  # once
    assert usage["completion_tokens"] == 15 and usage["total_tokens"] == len(PROMPT_IDS) + 15
    assert sorted(c.seed for c in h.decode.calls) == [40, 41, 42]
    assert h.lifecycle.in_flight == 0


def test_chat_n_streamed_interleaves_choices_each_with_its_finish() -> None:
    h = Harness(prefill=False)
    body = {
        "messages": CHAT,
        "max_tokens": 4,
        "n": 2,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = _post(h, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    chunks = events(r.text)[:-1]
    *deltas, usage = chunks
    roles = [c for c in deltas if c["choices"][0]["delta"].get("role") == "assistant"]
    assert [c["choices"][0]["index"] for c in roles] == [0, 1]  # one role chunk per choice
    text = {0: "", 1: ""}
    finishes = []
    for c in deltas:
        [choice] = c["choices"]
        text[choice["index"]] += choice["delta"]["content"] or ""
        if choice["finish_reason"] is not None:
            finishes.append((choice["index"], choice["finish_reason"]))
    assert sorted(finishes) == [(0, "length"), (1, "length")]
    assert text[0] == text[1] != ""  # greedy: identical choices
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    prompt_tokens = usage["usage"]["prompt_tokens"]
    assert usage["usage"]["total_tokens"] == prompt_tokens + 8
    assert SEED_HEADER not in r.headers


@pytest.mark.parametrize("stream", [False, True])
def test_echo_puts_the_prompt_before_each_choice(stream: bool) -> None:
    h = Harness()
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "echo": True, "n": 2}
    r = _post(h, "/v1/completions", {**body, "stream": stream})
    assert r.status_code == 200, r.text
    want = PROMPT + _text(greedy(PROMPT_IDS, 4))
    if stream:
        texts = {0: "", 1: ""}
        firsts: dict[int, str] = {}
        for c in events(r.text)[:-1]:
            [choice] = c["choices"]
            firsts.setdefault(choice["index"], choice["text"])
            texts[choice["index"]] += choice["text"]
        assert all(first.startswith(PROMPT) for first in firsts.values())  # the first chunk
        assert texts == {0: want, 1: want}
    else:
        assert [c["text"] for c in r.json()["choices"]] == [want, want]


def test_echo_of_token_ids_decodes_them() -> None:
    h = Harness()
    body = {"prompt": PROMPT_IDS, "max_tokens": 2, "temperature": 0, "echo": True}
    [choice] = _post(h, "/v1/completions", body).json()["choices"]
    assert choice["text"] == TOKENIZER.decode(PROMPT_IDS) + _text(greedy(PROMPT_IDS, 2))


@pytest.mark.parametrize("prefill", [True, False])
def test_cached_tokens_of_a_repeated_prompt(prefill: bool) -> None:
    h = Harness(prefill=prefill)
    body = {"prompt": LONG, "max_tokens": 2, "temperature": 0}
    first = _post(h, "/v1/completions", body).json()["usage"]
    again = _post(h, "/v1/completions", body).json()["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    n = len(TOKENIZER(LONG)["input_ids"])
    assert again["prompt_tokens_details"]["cached_tokens"] == (n - 1) // BLOCK * BLOCK > 0


def test_more_samples_than_the_bound_is_400_fewer_pass() -> None:
    h = Harness(lifecycle=Lifecycle(max_in_flight=2, max_queued=0))
    r = _post(h, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "n": 3})
    assert r.status_code == 400 and "--max-concurrent-requests" in r.json()["error"]["message"]
    r = _post(h, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "n": 2})
    assert r.status_code == 200, r.text
    assert h.lifecycle.in_flight == 0


class _Context:
    def time_remaining(self) -> float | None:
        return 10.0

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


async def _grpc(h: Harness, request: generation_pb2.GenerateRequest) -> list[Any]:
    servicer = GenerationServicer(h.core, h.metrics, h.lifecycle)
    return [m async for m in servicer.Generate(request, _Context())]


def test_grpc_messages_carry_their_sample_index_seed_and_usage() -> None:
    h = Harness()
    request = generation_pb2.GenerateRequest(prompt=LONG, n=3)
    request.sampling.max_tokens = 3
    request.sampling.temperature = 0.7
    request.sampling.seed = 9
    messages = asyncio.run(_grpc(h, request))
    seeds = {m.index: m.seed for m in messages if m.HasField("seed")}
    assert seeds == {0: 9, 1: 10, 2: 11}
    lasts = {m.index: m for m in messages if m.finish_reason}
    assert sorted(lasts) == [0, 1, 2]
    assert all(m.usage.completion_tokens == 3 for m in lasts.values())
    assert lasts[0].usage.cached_tokens == 0
    assert lasts[1].usage.cached_tokens == lasts[2].usage.cached_tokens > 0  # shared prefix
    assert {m.request_id for m in messages} == {messages[0].request_id}


@pytest.mark.parametrize(("n", "message"), [(0, "n must be in [1, 16], got 0"), (17, "got 17")])
def test_grpc_n_out_of_range(n: int, message: str) -> None:
    request = generation_pb2.GenerateRequest(prompt=PROMPT, n=n)
    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(_grpc(Harness(), request))
    assert message in str(info.value)


def test_grpc_samples_beyond_capacity_are_refused_with_retry() -> None:
    h = Harness(lifecycle=Lifecycle(max_in_flight=3))

    async def go() -> None:
        await h.lifecycle.enter()  # the call's own slot (the interceptor's)
        await h.lifecycle.enter()  # someone else's
        try:
            await _grpc(h, generation_pb2.GenerateRequest(prompt=PROMPT, n=3))
        finally:
            h.lifecycle.leave()
            h.lifecycle.leave()

    with pytest.raises(Refused) as info:
        asyncio.run(go())
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert h.lifecycle.in_flight == 0
