"""Every failure of the HTTP API: its status and its OpenAI error object."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from server_runtime.grpc_runtime import Lifecycle
from tests.gateway.openai_api.harness import Harness

OK = {"prompt": "hello", "max_tokens": 2}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _post(h: Harness, path: str, body: Any, **headers: str) -> Any:
    async def go():  # type: ignore[no-untyped-def]
        async with h.client(**headers) as c:
            if isinstance(body, bytes | str):
                return await c.post(
                    path, content=body, headers={"content-type": "application/json"}
                )
            return await c.post(path, json=body)

    return asyncio.run(go())


def _error(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/completions", {**OK, "frobnicate": 1}, "unknown field 'frobnicate'"),
        ("/v1/completions", {"max_tokens": 2}, "missing required field 'prompt'"),
        ("/v1/completions", {**OK, "temperature": "hot"}, "temperature"),
        ("/v1/completions", {**OK, "temperature": -1}, "temperature must be >= 0"),
        ("/v1/completions", {**OK, "max_tokens": 10**6}, "exceeds the model's context length"),
        ("/v1/completions", {**OK, "max_tokens": 0}, "max_tokens must be >= 1"),
        ("/v1/completions", {**OK, "top_p": 0}, "top_p must be in (0, 1]"),
        ("/v1/completions", {**OK, "prompt": ""}, "prompt text is empty"),
        ("/v1/completions", {**OK, "prompt": [10**6]}, "outside the vocabulary"),
        ("/v1/completions", {**OK, "prompt": ["a", "b"]}, "batch of 2 prompts"),
        ("/v1/completions", {**OK, "n": 17}, "n must be in [1, 16], got 17"),
        ("/v1/completions", {**OK, "n": 0}, "n must be in [1, 16], got 0"),
        ("/v1/chat/completions", {**CHAT, "n": -1}, "n must be in [1, 16], got -1"),
        ("/v1/completions", {**OK, "logprobs": 21}, "logprobs must be in [0, 20], got 21"),
        ("/v1/completions", {**OK, "logprobs": -1}, "logprobs must be in [0, 20], got -1"),
        ("/v1/chat/completions", {**CHAT, "echo": True}, "echo=True is not supported yet"),
        ("/v1/completions", {**OK, "echo": True, "logprobs": 1}, "echo with logprobs is not"),
        ("/v1/completions", {**OK, "best_of": 3}, "best_of=3 is not supported yet"),
        ("/v1/completions", {**OK, "suffix": "x"}, "suffix='x' is not supported yet"),
        ("/v1/completions", {**OK, "presence_penalty": 2.5}, "presence_penalty must be in [-2"),
        ("/v1/completions", {**OK, "frequency_penalty": -3}, "frequency_penalty must be in"),
        ("/v1/completions", {**OK, "repetition_penalty": 0}, "repetition_penalty must be > 0"),
        ("/v1/completions", {**OK, "min_p": 1.5}, "min_p must be in [0, 1], got 1.5"),
        ("/v1/completions", {**OK, "min_tokens": 3}, "min_tokens (3) must be <= max_tokens (2)"),
        ("/v1/completions", {**OK, "min_tokens": -1}, "min_tokens must be >= 0"),
        ("/v1/completions", {**OK, "logit_bias": {"x": 1}}, "logit_bias keys must be token ids"),
        ("/v1/completions", {**OK, "logit_bias": {"5": 101}}, "logit_bias for token 5 must be"),
        ("/v1/completions", {**OK, "logit_bias": {"1000000": 1}}, "outside the model's vocab"),
        ("/v1/chat/completions", {**CHAT, "logit_bias": {"-1": 1}}, "token id -1 is outside"),
        ("/v1/chat/completions", {**CHAT, "presence_penalty": "high"}, "presence_penalty"),
        ("/v1/completions", {**OK, "seed": -1}, "seed must be in [0, 2**64)"),
        ("/v1/completions", {**OK, "stream_options": {"include_usage": True}}, "stream is true"),
        ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools="),
        (
            "/v1/chat/completions",
            {**CHAT, "logprobs": True, "top_logprobs": 21},
            "top_logprobs must be in [0, 20], got 21",
        ),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "only allowed when logprobs is"),
        (
            "/v1/chat/completions",
            {**CHAT, "response_format": {"type": "xml"}},
            "response_format.type",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "response_format": {"type": "json_schema"}},
            "needs json_schema.schema",
        ),
        (
            "/v1/chat/completions",
            {
                **CHAT,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "frobnicate"}},
                },
            },
            "invalid json_schema",
        ),
        (
            "/v1/completions",
            {**OK, "structured_outputs": {"regex": "a(b"}},
            "invalid regex",
        ),
        (
            "/v1/completions",
            {**OK, "structured_outputs": {"regex": "a", "choice": ["x"]}},
            "exactly one of json, json_object, regex, choice and grammar, got regex and choice",
        ),
        (
            "/v1/completions",
            {**OK, "structured_outputs": {"grammar": "start: nothing_here"}},
            "invalid grammar",
        ),
        (
            "/v1/completions",
            {
                **OK,
                "response_format": {"type": "json_object"},
                "structured_outputs": {"regex": "a"},
            },
            "not both",
        ),
        ("/v1/chat/completions", {**CHAT, "messages": []}, "no messages"),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "wizard", "content": "x"}]},
            "unknown role 'wizard'",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "content parts of type 'image_url' are not supported yet",
        ),
        ("/v1/chat/completions", {**CHAT, "messages": [{"content": "x"}]}, "'messages.0.role'"),
        ("/tokenize", {"prompt": "a", "messages": CHAT["messages"]}, "exactly one of"),
        ("/detokenize", {"tokens": [-1]}, "outside the vocabulary"),
    ],
)
def test_bad_requests_are_400_naming_the_problem(path: str, body: Any, message: str) -> None:
    error = _error(_post(Harness(), path, body), 400)
    assert message in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body",
    [
        {**OK, "n": 1, "presence_penalty": 0, "logprobs": None, "echo": False, "best_of": 1},
        {**OK, "repetition_penalty": 1.0, "min_p": 0, "logit_bias": {}, "user": "u"},
    ],
)
def test_neutral_values_of_unsupported_options_are_accepted(body: Any) -> None:
    assert _post(Harness(), "/v1/completions", body).status_code == 200


def test_chat_neutral_values_and_sdk_metadata_are_accepted() -> None:
    body = {
        **CHAT,
        "n": 1,
        "logprobs": False,
        "response_format": {"type": "text"},
        "tools": [],
        "metadata": {"k": "v"},
        "store": False,
        "service_tier": "auto",
        "parallel_tool_calls": True,
    }
    assert _post(Harness(), "/v1/chat/completions", body).status_code == 200


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"prompt": "hi",', "malformed JSON body"),
        (b"[1, 2]", "must be a JSON object"),
        (b"\xff\xfe", "malformed JSON body"),
    ],
)
def test_malformed_json_is_400(raw: bytes, message: str) -> None:
    assert message in _error(_post(Harness(), "/v1/completions", raw), 400)["message"]


def test_unknown_model_is_404() -> None:
    error = _error(_post(Harness(), "/v1/completions", {**OK, "model": "gpt-4"}), 404)
    assert "'gpt-4' does not exist" in error["message"]
    assert error["code"] == "model_not_found" and error["param"] == "model"


def test_auth() -> None:
    h = Harness(tokens=("sekret",))
    error = _error(_post(h, "/v1/completions", OK), 401)
    assert "missing credentials" in error["message"]
    assert _error(_post(h, "/v1/models", OK, authorization="Bearer nope"), 401)
    ok = _post(h, "/v1/completions", OK, authorization="Bearer sekret")
    assert ok.status_code == 200

    async def health():  # type: ignore[no-untyped-def]
        async with h.client() as c:
            return await c.get("/health")

    assert asyncio.run(health()).status_code == 200  # probes need no token
    assert h.count("/v1/completions", 401) == 1 and h.count("/health", 200) == 1


def test_shed_by_admission_is_429_with_retry_after() -> None:
    lifecycle = Lifecycle(max_in_flight=1, max_queued=0, retry_after_s=0.3)
    h = Harness(lifecycle=lifecycle)
    lifecycle._take()  # one request in flight: the next has no slot and no queue
    for body in (OK, {**OK, "stream": True}):
        r = _post(h, "/v1/completions", body)
        error = _error(r, 429)
        assert "at capacity" in error["message"] and error["type"] == "rate_limit_error"
        assert r.headers["retry-after"] == "1" and r.headers["retry-after-ms"] == "300"


def test_draining_and_no_worker_are_503() -> None:
    h = Harness()
    h.lifecycle.drain()
    assert "shutting down" in _error(_post(h, "/v1/completions", OK), 503)["message"]
    h = Harness(decode=False)
    for body in (OK, {**OK, "stream": True}):
        error = _error(_post(h, "/v1/completions", body), 503)
        assert error["code"] == "service_unavailable"
    assert h.lifecycle.in_flight == 0


def test_past_the_deadline_is_504_and_bad_timeouts_400() -> None:
    r = _post(Harness(), "/v1/completions", OK, **{"x-request-timeout": "0.000001"})
    assert _error(r, 504)["code"] == "timeout"
    r = _post(Harness(), "/v1/completions", OK, **{"x-request-timeout": "soon"})
    assert "x-request-timeout" in _error(r, 400)["message"]


def test_unknown_route_is_an_openai_error() -> None:
    async def go():  # type: ignore[no-untyped-def]
        async with Harness().client() as c:
            return await c.get("/v1/nothing")

    assert "Not Found" in _error(asyncio.run(go()), 404)["message"]


def test_a_client_leaving_mid_stream_cancels_the_request() -> None:
    """Raw ASGI: the client disconnects after the first events; the workers' streams are
    cancelled and the admission slot is back."""
    h = Harness()
    body = json.dumps({"prompt": "hello", "max_tokens": 200, "stream": True}).encode()
    sent: list[dict[str, Any]] = []
    got_two = asyncio.Event()

    async def go() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await got_two.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if len([m for m in sent if m.get("body")]) >= 2:
                got_two.set()
            await asyncio.sleep(0.001)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "path": "/v1/completions",
            "raw_path": b"/v1/completions",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json")],
            "scheme": "http",
            "server": ("test", 80),
            "client": ("127.0.0.1", 1),
            "root_path": "",
        }
        await asyncio.wait_for(h.app(scope, receive, send), 10)

    asyncio.run(go())
    chunks = [m for m in sent if m.get("body")]
    assert sent[0]["status"] == 200 and len(chunks) < 50  # far fewer than 200 tokens
    assert all(s.cancelled for s in h.decode.streams)
    assert h.lifecycle.in_flight == 0
    assert h.decode.produced < 199
