"""The OpenAI-compatible HTTP API end to end, with the official ``openai`` client, over a real
cluster in both modes: greedy text and token counts as transformers', errors as the SDK's
exceptions, and an abandoned stream frees every block."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from pdserve.local_cluster import Cluster, free_port_range, start_cluster
from tests.e2e import reference

pytestmark = pytest.mark.e2e

TOKEN = "e2e-openai-token"
PROMPTS = [("The capital of France is", 12), ("List three primary colors:", 24)]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", params=["disaggregated", "colocated"])
def cluster(
    request: pytest.FixtureRequest, default_model_path: Path, cluster_logs: Path
) -> Iterator[Cluster]:
    tokens = cluster_logs / "openai-tokens"
    tokens.write_text(TOKEN + "\n")
    c = start_cluster(
        str(default_model_path),
        prefill=1 if request.param == "disaggregated" else 0,
        decode=1,
        log_dir=cluster_logs,
        extra=("--auth-token-file", str(tokens)),
        http_port=free_port_range(1),
    )
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def client(cluster: Cluster) -> Iterator[openai.OpenAI]:
    assert cluster.http is not None
    with openai.OpenAI(base_url=f"{cluster.http}/v1", api_key=TOKEN, max_retries=0) as c:
        yield c


def _model(default_model_path: Path) -> str:
    return str(default_model_path)


def _expected(path: Path, prompt_ids: list[int], max_tokens: int) -> tuple[str, int, str]:
    tokens = reference.greedy(path, prompt_ids, max_tokens)
    text = reference.tokenizer(str(path)).decode(tokens, skip_special_tokens=True)
    return text, len(tokens), "length" if len(tokens) == max_tokens else "stop"


def test_completions_match_transformers(
    client: openai.OpenAI, default_model_path: Path, cluster: Cluster
) -> None:
    tok = reference.tokenizer(str(default_model_path))
    model = _model(default_model_path)
    for prompt, max_tokens in PROMPTS:
        ids = tok(prompt)["input_ids"]
        text, count, finish = _expected(default_model_path, ids, max_tokens)
        whole = client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, seed=1
        )
        assert whole.id.startswith("cmpl-") and whole.object == "text_completion"
        assert whole.choices[0].text == text and whole.choices[0].finish_reason == finish
        assert whole.usage is not None
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(ids), count)
        assert whole.usage.total_tokens == len(ids) + count
        assert whole.system_fingerprint and whole.system_fingerprint.startswith("pdserve-")
        chunks = list(
            client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        *texts, last = chunks
        assert "".join(c.choices[0].text for c in texts) == text
        assert texts[-1].choices[0].finish_reason == finish
        assert last.choices == [] and last.usage is not None
        assert last.usage.completion_tokens == count and last.usage.prompt_tokens == len(ids)
    assert all(s.free_blocks == s.total_blocks for s in cluster.wait_idle())


def test_chat_matches_transformers(client: openai.OpenAI, default_model_path: Path) -> None:
    tok = reference.tokenizer(str(default_model_path))
    ids = list(
        tok.apply_chat_template(
            QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )
    text, count, finish = _expected(default_model_path, ids, 16)
    whole = client.chat.completions.create(
        model=_model(default_model_path),
        messages=QUESTION,
        max_tokens=16,
        temperature=0,  # type: ignore[arg-type]
    )
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == text
    assert whole.choices[0].finish_reason == finish
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(ids), count)
    stream = client.chat.completions.create(
        model=Path(_model(default_model_path)).name,  # the basename is a served name too
        messages=QUESTION,  # type: ignore[arg-type]
        max_completion_tokens=16,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "hi", "max_tokens": 10**6}, "exceeds the model's context length"),
        ({"prompt": "hi", "temperature": -0.5}, "temperature must be >= 0"),
        ({"prompt": "", "max_tokens": 4}, "prompt text is empty"),
        ({"prompt": "hi", "n": 17}, "n must be in [1, 16], got 17"),
        ({"prompt": "hi", "logprobs": 21}, "logprobs must be in [0, 20], got 21"),
        ({"prompt": "hi", "extra_body": {"bogus": 1}}, "unknown field 'bogus'"),
    ],
)
def test_bad_input_is_bad_request(
    client: openai.OpenAI, default_model_path: Path, kwargs: dict, message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=_model(default_model_path), **kwargs)
    assert message in str(info.value)


def test_unknown_model_and_missing_token(cluster: Cluster, default_model_path: Path) -> None:
    base = f"{cluster.http}/v1"
    with (
        openai.OpenAI(base_url=base, api_key=TOKEN, max_retries=0) as c,
        pytest.raises(openai.NotFoundError),
    ):
        c.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with (
        openai.OpenAI(base_url=base, api_key="unused", max_retries=0) as c,
        pytest.raises(openai.AuthenticationError),
    ):
        c.completions.create(model=_model(default_model_path), prompt="hi", max_tokens=2)
    assert httpx.get(f"{cluster.http}/health").status_code == 200  # open without a token


def test_abandoned_stream_frees_every_block(
    client: openai.OpenAI, cluster: Cluster, default_model_path: Path
) -> None:
    stream = client.completions.create(
        model=_model(default_model_path),
        prompt="Once upon a time, in a small village by the sea,",
        max_tokens=2000,
        temperature=0,
        extra_body={"ignore_eos": True},
        stream=True,
    )
    for i, _ in enumerate(stream):
        if i == 1:
            break
    stream.close()
    statuses = cluster.wait_idle(timeout_s=20)
    assert "client_disconnected" in cluster.logs()
    for status in statuses:
        assert status.free_blocks == status.total_blocks and status.running == 0, status
        assert status.pending_transfers == 0 and status.pool_ok, status


def test_models_and_tokenize_round_trip(cluster: Cluster, default_model_path: Path) -> None:
    headers = {"authorization": f"Bearer {TOKEN}"}
    models = httpx.get(f"{cluster.http}/v1/models", headers=headers).json()
    [card] = models["data"]
    assert card["id"] == _model(default_model_path) and card["max_model_len"] > 0
    text = "The capital of France is Paris."
    tok = httpx.post(f"{cluster.http}/tokenize", json={"prompt": text}, headers=headers).json()
    expected = reference.tokenizer(str(default_model_path))(text)["input_ids"]
    assert tok["tokens"] == expected and tok["count"] == len(expected)
    assert tok["max_model_len"] == card["max_model_len"]
    back = httpx.post(
        f"{cluster.http}/detokenize", json={"tokens": tok["tokens"]}, headers=headers
    ).json()
    assert back["prompt"] == reference.tokenizer(str(default_model_path)).decode(expected)
    chat = httpx.post(
        f"{cluster.http}/tokenize", json={"messages": QUESTION}, headers=headers
    ).json()
    assert chat["count"] > len(QUESTION[0]["content"].split())
