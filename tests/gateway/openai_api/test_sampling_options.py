"""The HTTP API's generation options: OpenAI's penalties and logit_bias, vLLM's
repetition_penalty, min_p, min_tokens and include_stop_str_in_output reach the workers as the
gRPC API sends them; the seed comes back in ``x-pdserve-seed``. (Bad values: test_errors.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from core.sampling import SamplingParams
from gateway.openai_api.serving import SEED_HEADER
from tests.gateway.fakes import greedy
from tests.gateway.openai_api.harness import MAX_MODEL_LEN, TOKENIZER, Harness, events

PROMPT = "The capital of France is"
PROMPT_IDS = TOKENIZER(PROMPT)["input_ids"]
OPTIONS = {
    "presence_penalty": 0.5,
    "frequency_penalty": -1.25,
    "repetition_penalty": 1.3,
    "min_p": 0.05,
    "min_tokens": 3,
    "logit_bias": {"17": -100, "5": 2.5},
}


def _post(h: Harness, path: str, body: dict[str, Any]) -> Any:
    async def go():  # type: ignore[no-untyped-def]
        async with h.client() as c:
            return await c.post(path, json=body)

    return asyncio.run(go())


def _sent(h: Harness) -> SamplingParams:
    sampling = h.decode.calls[-1].sampling
    assert sampling is not None
    return sampling


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": PROMPT}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]}),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_options_are_accepted_and_reach_the_workers(
    path: str, body: dict[str, Any], stream: bool
) -> None:
    h = Harness()
    r = _post(h, path, {**body, **OPTIONS, "max_tokens": 6, "temperature": 0, "stream": stream})
    assert r.status_code == 200, r.text
    sent = _sent(h)
    assert sent.presence_penalty == 0.5 and sent.frequency_penalty == -1.25
    assert sent.repetition_penalty == 1.3 and sent.min_p == 0.05 and sent.min_tokens == 3
    assert sent.logit_bias == ((5, 2.5), (17, -100.0))  # string keys -> sorted token ids
    assert h.prefill.calls[-1].min_tokens == 3  # the prefill tier samples with them too
    assert SEED_HEADER not in r.headers  # greedy: no seed in play


def test_neutral_values_are_the_defaults() -> None:
    h = Harness()
    neutral = {
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1,
        "min_p": 0,
        "min_tokens": 0,
        "logit_bias": {},
        "include_stop_str_in_output": False,
    }
    r = _post(h, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, **neutral})
    assert r.status_code == 200, r.text
    assert _sent(h) == SamplingParams(max_tokens=2, seed=_sent(h).seed)


def test_min_tokens_with_max_tokens_unset_is_checked_against_the_context() -> None:
    h = Harness(prefill=False)
    r = _post(h, "/v1/completions", {"prompt": PROMPT, "min_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert _sent(h).max_tokens == MAX_MODEL_LEN - len(PROMPT_IDS) and _sent(h).min_tokens == 4
    r = _post(h, "/v1/completions", {"prompt": PROMPT, "min_tokens": MAX_MODEL_LEN})
    assert r.status_code == 400
    assert "exceeds the model's context length" in r.json()["error"]["message"]


def test_include_stop_str_in_output() -> None:
    h = Harness(prefill=False)
    full = TOKENIZER.decode(greedy(PROMPT_IDS, 20), skip_special_tokens=True)
    stop = full[5:7]
    base = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "stop": stop}
    cut = _post(h, "/v1/completions", base).json()["choices"][0]
    kept = _post(h, "/v1/completions", {**base, "include_stop_str_in_output": True})
    kept_choice = kept.json()["choices"][0]
    assert cut["text"] == full[: full.index(stop)]
    assert kept_choice["text"] == full[: full.index(stop) + len(stop)]
    assert kept_choice["finish_reason"] == "stop"
    assert _sent(h).include_stop_str_in_output


@pytest.mark.parametrize("stream", [False, True])
def test_the_seed_comes_back_in_a_header(stream: bool) -> None:
    h = Harness()
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0.8, "stream": stream}
    r = _post(h, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assigned = int(r.headers[SEED_HEADER])
    assert assigned == _sent(h).seed  # the one every tier sampled with
    if stream:
        assert events(r.text)[-1] == "[DONE]"
    r = _post(h, "/v1/completions", {**body, "seed": 99})
    assert r.headers[SEED_HEADER] == "99"
