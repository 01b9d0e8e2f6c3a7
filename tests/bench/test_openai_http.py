"""``pdserve bench --backend openai`` without a model: the SSE parser, the timing rules, and the
client against an in-process HTTP/1.1 server that streams SSE (bearer token, 429 + Retry-After,
``GET /v1/models``, keep-alive)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from pdserve.bench.datasets import BenchRequest
from pdserve.bench.load import LoadSpec
from pdserve.bench.openai_http import (
    OpenAITarget,
    bench_openai_async,
    check_lengths,
    payload,
    pool_size,
)
from pdserve.bench.runner import ClientOptions, RunSettings
from pdserve.bench.sse import SseParser, StreamTimer
from pdserve.cli import build_parser
from pdserve.client import RetryPolicy

REQUEST = BenchRequest((1, 2, 3), 4)
TOKEN = "sse-token-0123456789"


def _chunk(text: str | None, finish: str | None = None, **extra: Any) -> str:
    choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish}
    return json.dumps({"object": "text_completion", "choices": [choice], **extra})


def _usage(completion: int, prompt: int = 3) -> str:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    return json.dumps({"choices": [], "usage": usage})


# -- the SSE parser -----------------------------------------------------------------------------


def test_events_split_anywhere_come_out_whole() -> None:
    stream = b'data: {"a": 1}\n\n: a comment\n\ndata: [DONE]\n\n'
    for size in (1, 2, 3, 7, len(stream)):
        parser, events = SseParser(), []
        for i in range(0, len(stream), size):
            events += parser.feed(stream[i : i + size])
        assert events + parser.close() == ['{"a": 1}', "[DONE]"], size


def test_crlf_cr_multiline_data_and_other_fields() -> None:
    parser = SseParser()
    events = parser.feed(b"event: x\r\ndata: one\r\ndata:two\r\nid: 3\r\n\r\ndata: three\r\rdata")
    assert events == ["one\ntwo", "three"]
    assert parser.feed(b": four") == [] and parser.close() == ["four"]
    split = SseParser()  # a \r\n cut between reads is one line end, not two
    assert split.feed(b"data: a\r") == [] and split.feed(b"\n\r\n") == ["a"]


# -- the timing rules ---------------------------------------------------------------------------


def _timed(events: list[tuple[str, float]]) -> StreamTimer:
    timer = StreamTimer(sent=10.0)
    for data, now in events:
        timer.on_data(data, now)
    return timer


def test_text_chunks_are_token_events_and_usage_counts_the_tokens() -> None:
    timer = _timed(
        [
            (_chunk("A"), 10.5),
            (_chunk(""), 10.6),  # no text (a held-back character): not a token event
            (_chunk("B"), 10.7),
            (_chunk("CD", "length"), 11.0),  # two tokens, no running usage: one gap
            (_usage(5), 11.1),
            ("[DONE]", 11.1),
        ]
    )
    out = timer.outcome(REQUEST, origin=9.0)
    assert out.success and out.output_tokens == 5 and out.prompt_len == 3
    assert out.ttft_s == pytest.approx(0.5) and out.latency_s == pytest.approx(1.0)
    assert out.itl_s == pytest.approx((0.2, 0.3)) and out.start_s == pytest.approx(1.0)
    assert out.tpot_s == pytest.approx(0.5 / 4)  # (E2E - TTFT) / (usage tokens - 1)


def test_chat_role_chunk_is_not_the_first_token() -> None:
    def chat(delta: dict[str, str], finish: str | None = None) -> str:
        return json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    timer = _timed(
        [
            (chat({"role": "assistant", "content": ""}), 10.1),
            (chat({"content": "hi"}), 10.4),
            (chat({"content": "!"}, "stop"), 10.5),
            (_usage(2, prompt=11), 10.5),
        ]
    )
    out = timer.outcome(REQUEST, 10.0, prompt_len=timer.prompt_tokens)
    assert out.ttft_s == pytest.approx(0.4) and out.itl_s == pytest.approx((0.1,))
    assert out.output_tokens == 2 and out.prompt_len == 11


def test_running_usage_spreads_a_multi_token_chunk_over_its_tokens() -> None:
    timer = _timed(
        [
            (_chunk("A", usage={"completion_tokens": 1}), 10.2),
            (_chunk("BCD", usage={"completion_tokens": 4}), 10.5),
            (_chunk("E", "length", usage={"completion_tokens": 5}), 10.6),
        ]
    )
    out = timer.outcome(REQUEST, 10.0)
    assert out.itl_s == pytest.approx((0.1, 0.1, 0.1, 0.1)) and out.output_tokens == 5


def test_textless_chunks_tokens_join_the_next_gap() -> None:
    timer = _timed(
        [
            (_chunk("A", usage={"completion_tokens": 1}), 10.2),
            (_chunk("", usage={"completion_tokens": 2}), 10.3),  # a held-back byte
            (_chunk("B", "length", usage={"completion_tokens": 3}), 10.6),
        ]
    )
    out = timer.outcome(REQUEST, 10.0)
    assert out.itl_s == pytest.approx((0.2, 0.2)) and out.output_tokens == 3


def test_without_usage_the_token_events_are_the_count() -> None:
    out = _timed([(_chunk("A"), 10.1), (_chunk("B", "length"), 10.2)]).outcome(REQUEST, 10.0)
    assert out.success and out.output_tokens == 2


@pytest.mark.parametrize(
    ("events", "reason"),
    [
        ([(_chunk("A"), 10.1)], "finish reason None"),  # cut short
        ([(_usage(0), 10.1)], "finish reason None"),  # no token
        ([(_chunk("A"), 10.1), ('{"error": {"message": "boom"}}', 10.2)], "boom"),
        ([(_chunk("A"), 10.1), ("{not json", 10.2)], "malformed"),
        ([(_chunk("A", "error"), 10.1)], "finish reason error"),
    ],
)
def test_failed_streams(events: list[tuple[str, float]], reason: str) -> None:
    out = _timed(events).outcome(REQUEST, 10.0)
    assert not out.success and reason in out.error


def test_payloads() -> None:
    target = OpenAITarget("http://h:1/v1/")
    body = payload(target, "m", REQUEST, 0.0)
    assert target.url == "http://h:1/v1/completions"
    assert body["prompt"] == [1, 2, 3] and body["max_tokens"] == 4 and body["ignore_eos"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    chat = OpenAITarget("http://h:1/v1", "chat")
    body = payload(chat, "m", REQUEST, 0.5, "hello")
    assert chat.url == "http://h:1/v1/chat/completions"
    assert body["messages"] == [{"role": "user", "content": "hello"}]
    assert body["max_completion_tokens"] == 4 and body["temperature"] == 0.5
    with pytest.raises(ValueError, match="prompt text"):
        payload(chat, "m", REQUEST, 0.0)
    with pytest.raises(ValueError, match="base-url"):
        OpenAITarget("127.0.0.1:8000/v1")
    assert pool_size(24, LoadSpec(max_concurrency=4)) == 4 and pool_size(3, LoadSpec()) == 3


def test_exact_lengths_and_continuous_usage() -> None:
    peer = OpenAITarget("http://h:1/v1", continuous_usage=True, exact_lengths=True)
    body = payload(peer, "peer", REQUEST, 0.0)
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    with pytest.raises(ValueError, match="completions"):
        OpenAITarget("http://h:1/v1", "chat", exact_lengths=True)
    whole = [(_chunk("ABCD", "length"), 10.1), (_usage(4), 10.1)]
    ok = _timed(whole)
    assert check_lengths(ok.outcome(REQUEST, 10.0), REQUEST, ok).success
    for events in ([(_chunk("AB", "stop"), 10.1), (_usage(2), 10.1)], whole[:1]):
        short = _timed(events)
        out = check_lengths(short.outcome(REQUEST, 10.0), REQUEST, short)
        assert not out.success and "max_tokens 4" in out.error


def test_the_flags() -> None:
    args = build_parser().parse_args(
        ["bench", "--backend", "openai", "--base-url", "http://x:1/v1", "--endpoint", "chat"]
    )
    assert (args.backend, args.base_url, args.endpoint) == ("openai", "http://x:1/v1", "chat")
    assert args.served_model_name is None
    plain = build_parser().parse_args(["bench"])
    assert plain.backend == "pdserve" and plain.endpoint == "completions"


# -- the client against an SSE server -----------------------------------------------------------


@dataclass
class FakeServer:
    """HTTP/1.1 keep-alive; ``/v1/models`` and a completions stream of ``max_tokens`` tokens,
    one every ``gap_s``; the first ``refuse`` completions get 429 with ``Retry-After``."""

    gap_s: float = 0.01
    refuse: int = 0
    connections: int = 0
    auth: list[str | None] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.auth.append(headers.get("authorization"))
                if method == "GET" and path == "/v1/models":
                    doc = json.dumps({"object": "list", "data": [{"id": "fake-model"}]})
                    writer.write(_response(200, doc.encode(), "application/json"))
                elif path == "/v1/completions" and self.refuse > 0:
                    self.refuse -= 1
                    err = b'{"error": {"message": "busy"}}'
                    writer.write(_response(429, err, "application/json", "retry-after: 0.01\r\n"))
                elif path == "/v1/completions":
                    await self._stream(json.loads(body), writer)
                else:
                    writer.write(_response(404, b'{"error": {"message": "no"}}', "text/plain"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _stream(self, body: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        self.bodies.append(body)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        n = body["max_tokens"]
        for k in range(n):
            await asyncio.sleep(self.gap_s)
            finish = "length" if k == n - 1 else None
            _write_chunk(writer, f"data: {_chunk(chr(65 + k % 26), finish)}\n\n".encode())
            await writer.drain()
        if body["stream_options"]["include_usage"]:
            _write_chunk(writer, f"data: {_usage(n, len(body['prompt']))}\n\n".encode())
        _write_chunk(writer, b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")


def _write_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


def _response(status: int, body: bytes, kind: str, extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status} X\r\ncontent-type: {kind}\r\ncontent-length: {len(body)}\r\n"
    return (head + extra + "\r\n").encode() + body


@pytest.fixture
def server() -> Iterator[FakeServer]:
    yield FakeServer()


async def _run(
    fake: FakeServer, options: ClientOptions, load: LoadSpec, n: int = 6, model: str | None = None
) -> tuple[list[Any], str]:
    srv = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        target = OpenAITarget(f"http://127.0.0.1:{port}/v1", model=model)
        requests = [BenchRequest((1, 2, 3, i), 5) for i in range(n)]
        settings = RunSettings(slos_ms={}, timeout_s=30, disable_progress=True)
        outcomes, _, served = await bench_openai_async(target, requests, load, settings, options)
    finally:
        srv.close()
        await srv.wait_closed()
    return outcomes, served


def test_streams_are_timed_with_the_token_on_a_kept_alive_pool(server: FakeServer) -> None:
    options = ClientOptions(token=TOKEN)
    outcomes, model = asyncio.run(_run(server, options, LoadSpec(math.inf, max_concurrency=2)))
    assert model == "fake-model"  # asked GET /v1/models
    assert all(o.success for o in outcomes), [o.error for o in outcomes]
    assert [o.output_tokens for o in outcomes] == [5] * 6
    assert [o.prompt_len for o in outcomes] == [4] * 6
    for o in outcomes:
        assert len(o.itl_s) == 4 and all(g > 0.005 for g in o.itl_s)
        assert o.latency_s > o.ttft_s > 0.005
    assert server.auth and set(server.auth) == {f"Bearer {TOKEN}"}
    # models + warm-up + 6 requests over at most 2 concurrent: the pool reuses its connections
    assert server.connections <= 2
    assert all(b["model"] == "fake-model" and b["ignore_eos"] for b in server.bodies)


def test_429_is_retried_after_retry_after(server: FakeServer) -> None:
    server.refuse = 3
    retrying = ClientOptions(retry=RetryPolicy(max_attempts=5))
    outcomes, _ = asyncio.run(_run(server, retrying, LoadSpec(math.inf), n=2, model="given"))
    assert all(o.success for o in outcomes) and server.refuse == 0
    assert not any(a for a in server.auth)  # no token: no header
    server.refuse = 10
    with pytest.raises(RuntimeError, match="HTTP 429: busy"):  # the warm-up is refused
        asyncio.run(_run(server, ClientOptions(retry=RetryPolicy(max_attempts=1)), LoadSpec()))
