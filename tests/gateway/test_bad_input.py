"""A client's mistake is answered once, with its own status, and never retried elsewhere:
request ids are checked at the gateway before any worker is involved (gRPC field and metadata,
HTTP header), and a worker call's failure is retried only when another worker may succeed."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from core.errors import InvalidRequestError
from core.rich_errors import rich_status
from core.sampling import SamplingParams
from gateway.errors import UpstreamError, worker_failure
from gateway.generation import FailoverConfig, GenerationCore
from gateway.prompts import PromptTokenizer
from gateway.router import Router, RoutingConfig
from gateway.servicer import STATUS_CODES, WORK_METHODS, GenerationServicer
from gateway.validation import validate_request_id
from gateway.worker_calls import upstream_error
from gateway.worker_clients import DecodeClient
from protos.pdserve.v1 import generation_pb2, generation_pb2_grpc, worker_pb2, worker_pb2_grpc
from server_runtime.grpc_runtime import Lifecycle, start_server
from server_runtime.interceptors import MAX_REQUEST_ID_CHARS, CallScope
from tests.gateway.fakes import FakeDecode, FakePrefill, entry, registry
from tests.gateway.openai_api.harness import Harness
from tests.support.tokenizers import build_byte_level_tokenizer

TOKENIZER = build_byte_level_tokenizer(512)
PROMPT = list(range(20, 60))
BAD_IDS = ["", "a\nb", "tab\there", "with space", "caf\u00e9", "\x7f", "x" * 129, "y" * 5000]
GOOD_IDS = [
    uuid.uuid4().hex,
    str(uuid.uuid4()),
    "cmpl-" + uuid.uuid4().hex,
    "chatcmpl-abc_DEF.123:4/5=6",
    "x" * MAX_REQUEST_ID_CHARS,
]


@pytest.mark.parametrize("rid", GOOD_IDS)
def test_usual_request_ids_are_accepted(rid: str) -> None:
    validate_request_id(rid)


@pytest.mark.parametrize("rid", BAD_IDS)
def test_request_ids_that_cannot_travel_as_metadata_are_refused_naming_the_rule(rid: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate_request_id(rid, "request_id")
    message = str(info.value)
    assert message.startswith("request_id ")
    assert "printable ASCII" in message and str(MAX_REQUEST_ID_CHARS) in message
    assert "\n" not in message  # the offending character is shown escaped


def _core(prefill: list, decode: list, attempts: int = 4) -> GenerationCore:
    router = Router(registry(prefill, decode), RoutingConfig(affinity_tokens=0))
    return GenerationCore(
        TOKENIZER,
        PromptTokenizer(TOKENIZER, 1024, 512),
        1024,
        router,
        failover=FailoverConfig(max_attempts=attempts),
    )


def test_grpc_generate_refuses_a_bad_request_id_before_any_worker_call() -> None:
    decode, prefill = FakeDecode("d0"), FakePrefill("p0")
    core = _core([entry(prefill)], [entry(decode)])

    async def body() -> None:
        lifecycle = Lifecycle()
        servicer = GenerationServicer(core, lifecycle=lifecycle)
        handle = await start_server(
            "127.0.0.1:0",
            ["pdserve.v1.Generation"],
            [functools.partial(generation_pb2_grpc.add_GenerationServicer_to_server, servicer)],
            lifecycle=lifecycle,
            interceptors=[CallScope(lifecycle, WORK_METHODS, STATUS_CODES)],
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
                stub = generation_pb2_grpc.GenerationStub(channel)
                for rid in ["a\nb", "caf\u00e9", "z" * 3000]:
                    req = generation_pb2.GenerateRequest(prompt="hi", request_id=rid)
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        async for _ in stub.Generate(req, timeout=5):
                            pass
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert "request_id" in (info.value.details() or "")
                # metadata may carry spaces, which the rule refuses too
                req = generation_pb2.GenerateRequest(prompt="hi")
                call = stub.Generate(req, metadata=(("x-request-id", "has space"),), timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in call:
                        pass
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "x-request-id" in (info.value.details() or "")
                good = generation_pb2.GenerateRequest(prompt="hi", request_id="cmpl-1")
                replies = [m async for m in stub.Generate(good, timeout=5)]
                assert replies[0].request_id == "cmpl-1"
            assert lifecycle.in_flight == 0
        finally:
            await handle.server.stop(0)

    asyncio.run(body())
    assert len(decode.calls) == 1 and len(prefill.calls) == 1  # only the good request's


@pytest.mark.parametrize(
    "header", [b"has space", "caf\u00e9".encode("latin-1"), b"q" * 300, b"\x01"]
)
def test_http_refuses_a_bad_x_request_id_with_400(header: bytes) -> None:
    h = Harness()

    async def go() -> object:
        async with h.client() as c:
            return await c.post(
                "/v1/completions",
                json={"prompt": "hello", "max_tokens": 2},
                headers=[(b"x-request-id", header)],
            )

    r = asyncio.run(go())
    assert r.status_code == 400, r.text  # type: ignore[attr-defined]
    error = r.json()["error"]  # type: ignore[attr-defined]
    assert "x-request-id" in error["message"] and "printable ASCII" in error["message"]
    assert error["param"] == "x-request-id"
    echoed = r.headers["x-request-id"]  # type: ignore[attr-defined]
    assert echoed.encode() != header and len(echoed) == 32  # a fresh id, not the bad one
    assert not h.decode.calls and not h.prefill.calls


# ---- classification of worker failures -----------------------------------------------------

CAPACITY = grpc.StatusCode.RESOURCE_EXHAUSTED


def _rpc_error(code: grpc.StatusCode, details: str, retry_after_s: float | None = None):  # type: ignore[no-untyped-def]
    status = rich_status(code, details, retry_after_s) if retry_after_s is not None else None
    trailing = grpc.aio.Metadata(*status.trailing_metadata) if status else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


@pytest.mark.parametrize(
    ("code", "retry_info", "client_sees", "retryable"),
    [
        # another worker may succeed: it died or drains, is full, cancelled the call while
        # draining, or could not take the transfer this route needed
        (grpc.StatusCode.UNAVAILABLE, False, grpc.StatusCode.UNAVAILABLE, True),
        (CAPACITY, True, CAPACITY, True),
        (grpc.StatusCode.CANCELLED, False, grpc.StatusCode.UNAVAILABLE, True),
        (grpc.StatusCode.ABORTED, False, grpc.StatusCode.UNAVAILABLE, True),
        # deterministic: the same anywhere, reported with their own status
        (grpc.StatusCode.INVALID_ARGUMENT, False, grpc.StatusCode.INVALID_ARGUMENT, False),
        (grpc.StatusCode.FAILED_PRECONDITION, False, grpc.StatusCode.FAILED_PRECONDITION, False),
        (grpc.StatusCode.OUT_OF_RANGE, False, grpc.StatusCode.OUT_OF_RANGE, False),
        (grpc.StatusCode.UNIMPLEMENTED, False, grpc.StatusCode.UNIMPLEMENTED, False),
        (grpc.StatusCode.NOT_FOUND, False, grpc.StatusCode.NOT_FOUND, False),
        (grpc.StatusCode.DEADLINE_EXCEEDED, False, grpc.StatusCode.DEADLINE_EXCEEDED, False),
        (grpc.StatusCode.INTERNAL, False, grpc.StatusCode.INTERNAL, False),
        (grpc.StatusCode.UNKNOWN, False, grpc.StatusCode.UNKNOWN, False),
        (grpc.StatusCode.DATA_LOSS, False, grpc.StatusCode.DATA_LOSS, False),
        # a transport limit (message or metadata too large) is not capacity: no RetryInfo
        (CAPACITY, False, CAPACITY, False),
        # the gateway's own credentials refused by a worker: not the client's fault
        (grpc.StatusCode.UNAUTHENTICATED, False, grpc.StatusCode.INTERNAL, False),
        (grpc.StatusCode.PERMISSION_DENIED, False, grpc.StatusCode.INTERNAL, False),
    ],
)
def test_worker_failures_are_retried_only_when_another_worker_may_succeed(
    code: grpc.StatusCode, retry_info: bool, client_sees: grpc.StatusCode, retryable: bool
) -> None:
    assert worker_failure(code, retry_info) == (client_sees, retryable)
    exc = upstream_error("decode", "d0", _rpc_error(code, "boom", 0.25 if retry_info else None))
    assert (exc.code, exc.retryable) == (client_sees, retryable)
    assert str(exc) == "decode worker d0: boom" and exc.tier == "decode" and exc.address == "d0"
    assert exc.retry_after_s == (0.25 if retry_info else None)


class _Decode(worker_pb2_grpc.DecodeServicer):
    def __init__(self) -> None:
        self.calls = 0

    async def Generate(
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        self.calls += 1
        yield worker_pb2.DecodeResponse()


def test_metadata_the_grpc_library_refuses_locally_is_not_retryable() -> None:
    """The pre-validation failure mode of a bad request id: grpc refuses to send it, locally,
    as INTERNAL "Invalid metadata"; the worker never sees the call."""

    async def body() -> None:
        servicer = _Decode()
        server = grpc.aio.server()
        worker_pb2_grpc.add_DecodeServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        client = DecodeClient(f"127.0.0.1:{port}")
        try:
            stream = client.open(
                "a\nb", [1, 2, 3], SamplingParams(), remote_prefill=False, timeout=5
            )
            with pytest.raises(UpstreamError) as info:
                async for _ in stream.events():
                    pass
            assert not info.value.retryable
            assert info.value.code is grpc.StatusCode.INTERNAL
            assert "metadata" in str(info.value).lower()
            assert servicer.calls == 0
        finally:
            await client.close()
            await server.stop(0)

    asyncio.run(body())


# ---- the failover loop -----------------------------------------------------------------------


def _failure(code: grpc.StatusCode, tier: str, address: str) -> UpstreamError:
    client_code, retryable = worker_failure(code, False)
    return UpstreamError(client_code, f"{tier} worker {address}: no", tier=tier, address=address,
                         retryable=retryable)  # fmt: skip


async def _drain(core: GenerationCore, max_tokens: int = 6) -> list[int]:
    tokens: list[int] = []
    async for delta in core.generate("r1", PROMPT, SamplingParams(max_tokens=max_tokens), 10):
        tokens.extend(delta.token_ids)
    return tokens


NEVER_RETRIED = [
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
]


@pytest.mark.parametrize("code", NEVER_RETRIED)
def test_a_deterministic_prefill_failure_is_reported_once_with_its_own_status(
    code: grpc.StatusCode,
) -> None:
    p0 = FakePrefill("p0", fail=_failure(code, "prefill", "p0"))
    p1 = FakePrefill("p1")
    d0, d1 = FakeDecode("d0"), FakeDecode("d1")
    core = _core([entry(p0), entry(p1, waiting=3)], [entry(d0), entry(d1, running=3)])
    with pytest.raises(UpstreamError) as info:
        asyncio.run(_drain(core))
    assert info.value.code is worker_failure(code, False).code
    assert info.value.code is not grpc.StatusCode.UNAVAILABLE
    assert "no worker could serve" not in str(info.value)
    assert len(p0.calls) == 1 and not p1.calls and not d1.calls
    assert all(s.cancelled for s in d0.streams)  # the reservation was released


@pytest.mark.parametrize("code", NEVER_RETRIED)
def test_a_deterministic_decode_failure_mid_stream_is_not_resumed(code: grpc.StatusCode) -> None:
    d0, d1 = FakeDecode("d0"), FakeDecode("d1")
    d0.fail_streams[0] = _failure(code, "decode", "d0")
    core = _core([], [entry(d0), entry(d1, running=3)])
    with pytest.raises(UpstreamError) as info:
        asyncio.run(_drain(core))
    assert info.value.code is worker_failure(code, False).code
    assert not d1.calls


def test_a_local_error_while_calling_a_worker_is_not_retried() -> None:
    class Broken(FakeDecode):
        def open(self, *args: object, **kw: object):  # type: ignore[no-untyped-def, override]
            self.calls.append(None)  # type: ignore[arg-type]
            raise ValueError("Value out of range")

    d0, d1 = Broken("d0"), FakeDecode("d1")
    core = _core([], [entry(d0), entry(d1, running=3)])
    with pytest.raises(ValueError):
        asyncio.run(_drain(core))
    assert len(d0.calls) == 1 and not d1.calls


def test_retryable_failures_still_fail_over() -> None:
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED):
        p0 = FakePrefill("p0", fail=_failure(code, "prefill", "p0"))
        p1 = FakePrefill("p1")
        core = _core([entry(p0), entry(p1, waiting=3)], [entry(FakeDecode("d0"))])
        assert len(asyncio.run(_drain(core))) == 6
        assert len(p1.calls) == 1


# ---- HTTP bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[" * 100_000, "nested too deeply"),  # was RecursionError: 500
        (b'{"prompt":' * 5000 + b'"x"' + b"}" * 5000, "nested too deeply"),
        (b'{"prompt":"\\ud800","max_tokens":2}', "surrogates not allowed"),  # was TypeError: 500
        (b'{"prompt":["\\udfff"],"max_tokens":2}', "surrogates not allowed"),
        (b'{"prompt":"hi","max_tokens":2,"top_k":99999999999999999999}', "top_k must be at most"),
        (b'{"prompt":"hi","max_tokens":2,"stop_token_ids":[4294967296]}', "stop_token_ids entry"),
        (b'{"prompt":"hi","max_tokens":2,"temperature":1e39}', "temperature must be a finite"),
        (b'{"prompt":"hi","max_tokens":2,"top_p":1e-50}', "top_p must be in (0, 1]"),
        (b"\xff\xfe\x00garbage", "malformed JSON body"),
        (b"[]", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
    ],
)
def test_hostile_http_bodies_are_400_with_a_message(body: bytes, message: str) -> None:
    h = Harness()

    async def go() -> object:
        async with h.client() as c:
            return await c.post(
                "/v1/completions", content=body, headers={"content-type": "application/json"}
            )

    r = asyncio.run(go())
    assert r.status_code == 400, r.text  # type: ignore[attr-defined]
    assert message in r.json()["error"]["message"]  # type: ignore[attr-defined]
    assert not h.decode.calls


def test_a_valid_surrogate_pair_escape_is_text() -> None:
    h = Harness()

    async def go() -> object:
        async with h.client() as c:
            body = b'{"prompt":"smile \\ud83d\\ude00","max_tokens":2}'
            return await c.post(
                "/v1/completions", content=body, headers={"content-type": "application/json"}
            )

    assert asyncio.run(go()).status_code == 200  # type: ignore[attr-defined]
