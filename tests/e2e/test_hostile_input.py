"""Hostile input against a real cluster, both modes: each gets a clean status (INVALID_ARGUMENT /
HTTP 400 with a message, never UNKNOWN, INTERNAL or 5xx), a client's mistake is never retried
on another worker, and every pool is idle afterwards. The regressions of issue #15 first, then
a short property-based run (hypothesis) of ``benchmarks/fuzz_api.py``'s strategies."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import grpc
import httpx2 as httpx
import pytest
from hypothesis import given

from benchmarks.fuzz_api import (
    GRPC_INPUTS,
    HttpInput,
    Prober,
    decode_requests,
    fuzz_settings,
    openai_inputs,
    prefill_requests,
)
from pdserve.local_cluster import Cluster
from protos.pdserve.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

pytestmark = pytest.mark.e2e

EXAMPLES = 12  # per target and mode: the whole file stays well under a minute per mode
BAD_IDS = ["line\nbreak", "caf\u00e9", "z" * 5000]


@pytest.fixture
def channel(default_cluster: Cluster) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(default_cluster.gateway) as ch:
        yield ch


def _status(call: Iterator[object]) -> tuple[grpc.StatusCode, str]:
    try:
        for _ in call:
            pass
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, ""


def _unary(method: object, request: object) -> Iterator[object]:
    """A unary call as an iterator, so that :func:`_status` sees its failure."""
    yield method(request, timeout=30)  # type: ignore[operator]


def _request(**kw: object) -> generation_pb2.GenerateRequest:
    req = generation_pb2.GenerateRequest(**kw)  # type: ignore[arg-type]
    if not req.sampling.HasField("max_tokens"):
        req.sampling.max_tokens = 2
    return req


def test_undecodable_bytes_are_invalid_argument(channel: grpc.Channel) -> None:
    method = channel.unary_stream(
        "/pdserve.v1.Generation/Generate", request_serializer=lambda _: b"\xff\xff\xff"
    )
    code, details = _status(method(None, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT  # was UNKNOWN: Unexpected DecodeError
    assert "could not be decoded" in details


@pytest.mark.parametrize("rid", BAD_IDS, ids=["newline", "non-ascii", "5000-chars"])
def test_a_request_id_that_cannot_travel_is_refused_at_once(
    default_cluster: Cluster, channel: grpc.Channel, rid: str
) -> None:
    retries_before = len(default_cluster.events("request_retrying"))
    started = time.monotonic()
    stub = generation_pb2_grpc.GenerationStub(channel)
    code, details = _status(stub.Generate(_request(prompt="hi", request_id=rid), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details  # was UNAVAILABLE, 4 routes tried
    assert details.startswith("request_id ") and "printable ASCII" in details
    assert time.monotonic() - started < 5
    assert len(default_cluster.events("request_retrying")) == retries_before


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt_token_ids": [10**9]}, "outside the vocabulary"),
        ({"prompt_token_ids": [5] * 100_000}, "context length"),
        ({"prompt": "hi", "sampling": {"temperature": float("nan")}}, "temperature"),
        ({"prompt": "hi", "sampling": {"top_p": -1.0}}, "top_p"),
        # overflowed logits / temperature into NaN: every batch it joined failed, 4 routes tried
        ({"prompt": "hi", "sampling": {"temperature": 1e-45}}, "temperature must be 0 (greedy)"),
        ({"prompt": "hi", "sampling": {"repetition_penalty": 1e-45}}, "repetition_penalty"),
        ({"prompt": "hi", "sampling": {"stop": ["x"] * 100_000}}, "stop strings"),
        ({"prompt": "hi", "sampling": {"logit_bias": {10**9: 1.0}}}, "logit_bias"),
        ({"prompt": "hi", "sampling": {"stop_token_ids": [10**9]}}, "stop_token_ids"),
        ({"messages": [{"role": "", "content": "hi"}]}, "role"),
        ({"messages": []}, "no input"),
        ({"prompt": "hi", "n": 17}, "n must be in"),
        ({"prompt": "hi", "prompt_token_ids": [1]}, "exactly one input"),
        ({"prompt": "hi", "sampling": {"structured_output": {"regex": "("}}}, "invalid regex"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_generate_requests_are_invalid_argument(
    channel: grpc.Channel, fields: dict[str, object], message: str
) -> None:
    req = _request()
    req.MergeFrom(_request(**{k: v for k, v in fields.items() if k != "sampling"}))
    for name, value in dict(fields.get("sampling", {})).items():  # type: ignore[call-overload]
        if name == "structured_output":
            for kind, spec in value.items():
                setattr(req.sampling.structured_output, kind, spec)
        elif name == "logit_bias":
            req.sampling.logit_bias.update(value)
        elif isinstance(value, list):
            getattr(req.sampling, name).extend(value)
        else:
            setattr(req.sampling, name, value)
    stub = generation_pb2_grpc.GenerationStub(channel)
    code, details = _status(stub.Generate(req, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert message in details


def test_a_deeply_nested_json_schema_is_invalid_argument(channel: grpc.Channel) -> None:
    req = _request(prompt="hi")
    req.sampling.structured_output.json_schema = '{"items":' * 200 + "{}" + "}" * 200
    code, details = _status(generation_pb2_grpc.GenerationStub(channel).Generate(req, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code}: {details}"
    assert "recursion limit" in details, details


def _post(cluster: Cluster, path: str, body: object, **headers: str) -> httpx.Response:
    assert cluster.http is not None
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{cluster.http}{path}", content=content, headers=headers, timeout=30)


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (b"[" * 100_000, {}, "nested too deeply"),
        (b'{"prompt":"\\ud800","max_tokens":2}', {}, "surrogates"),
        (b"[1, 2]", {}, "must be a JSON object"),
        (b'"just text"', {}, "must be a JSON object"),
        (b"\xff\xfe\xfa", {}, "malformed JSON body"),
        ({"prompt": "hi", "max_tokens": 2, "top_k": 2**70}, {}, "top_k"),
        ({"prompt": "hi", "max_tokens": 2, "temperature": 1e39}, {}, "temperature"),
        ({"prompt": "hi", "max_tokens": 2}, {"x-request-id": "has space"}, "x-request-id"),
    ],
)
def test_bad_http_bodies_are_400(
    default_cluster: Cluster, body: object, headers: dict[str, str], message: str
) -> None:
    reply = _post(default_cluster, "/v1/completions", body, **headers)
    assert reply.status_code == 400, reply.text
    assert message in reply.json()["error"]["message"]


def test_wrong_content_types_and_chunked_garbage_get_no_5xx(default_cluster: Cluster) -> None:
    ok = {"prompt": "hi", "max_tokens": 2}
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "image/png"):
        reply = _post(default_cluster, "/v1/completions", ok, **{"content-type": content_type})
        assert reply.status_code in (200, 400, 415), reply.text

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "hi", '
        yield b"\x00\xff garbage \xfe"
        yield b"}" * 3

    assert default_cluster.http is not None
    reply = httpx.post(f"{default_cluster.http}/v1/completions", content=chunks(), timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["message"]


WORKER_CASES = [
    ({"prompt_token_ids": []}, "empty prompt_token_ids"),
    ({"prompt_token_ids": [10**9]}, "outside the vocabulary"),  # was UNAVAILABLE: step failed
    ({"sampling": {"logit_bias": {10**6: 1.0}}}, "outside the vocabulary"),  # the same
    ({"prompt_token_ids": [5] * 100_000}, "context length"),
    ({"sampling": {"max_tokens": 0}}, "max_tokens"),
    ({"sampling": {"temperature": float("nan")}}, "temperature"),
    ({"sampling": {"temperature": 1e-45}}, "temperature"),  # was UNAVAILABLE: NaN in the step
    ({"sampling": {"top_p": 0.0}}, "top_p"),
    ({"sampling": {"repetition_penalty": -1.0}}, "repetition_penalty"),
    ({"sampling": {"presence_penalty": float("inf")}}, "presence_penalty"),
]


def _worker_fields(fields: dict[str, object]) -> dict[str, object]:
    sampling = common_pb2.SamplingParams(max_tokens=2)
    for name, value in dict(fields.get("sampling", {})).items():  # type: ignore[call-overload]
        if isinstance(value, dict):
            getattr(sampling, name).update(value)
        else:
            setattr(sampling, name, value)
    return {"prompt_token_ids": fields.get("prompt_token_ids", [1, 2, 3]), "sampling": sampling}


@pytest.mark.parametrize(("fields", "message"), WORKER_CASES, ids=[m for _, m in WORKER_CASES])
def test_workers_refuse_bad_requests_with_invalid_argument(
    default_cluster: Cluster, fields: dict[str, object], message: str
) -> None:
    with grpc.insecure_channel(default_cluster.decode[0]) as ch:
        req = worker_pb2.DecodeRequest(request_id="w1", **_worker_fields(fields))  # type: ignore[arg-type]
        code, details = _status(worker_pb2_grpc.DecodeStub(ch).Generate(req, timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code}: {details}"
        assert message in details
    for address in default_cluster.prefill:
        with grpc.insecure_channel(address) as ch:
            ticket = worker_pb2.TransferTicket(transfer_id=b"0" * 16, kv_endpoint="tcp://x:1")
            req = worker_pb2.PrefillRequest(
                request_id="w2", ticket=ticket, **_worker_fields(fields)
            )  # type: ignore[arg-type]
            code, details = _status(_unary(worker_pb2_grpc.PrefillStub(ch).Prefill, req))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code}: {details}"
            assert message in details


def test_prefill_refuses_bad_tickets_cleanly(default_cluster: Cluster) -> None:
    for address in default_cluster.prefill:
        with grpc.insecure_channel(address) as ch:
            ticket = worker_pb2.TransferTicket(transfer_id=b"0" * 16, kv_endpoint="nowhere")
            req = worker_pb2.PrefillRequest(request_id="w3", prompt_token_ids=[1, 2], ticket=ticket)
            code, details = _status(_unary(worker_pb2_grpc.PrefillStub(ch).Prefill, req))
            assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ABORTED), details
            assert details
    _assert_idle(default_cluster)


def _assert_idle(cluster: Cluster) -> None:
    for s in cluster.wait_idle(30):
        assert s.free_blocks == s.total_blocks and s.running == 0 and s.waiting == 0, s
        assert s.pool_ok


# ---- the property-based smoke run ------------------------------------------------------------


@pytest.fixture
def prober(default_cluster: Cluster) -> Iterator[Prober]:
    p = Prober(
        default_cluster.gateway,
        default_cluster.http,
        default_cluster.prefill,
        default_cluster.decode,
    )
    try:
        yield p
    finally:
        p.close()


def _served_model(cluster: Cluster) -> str:
    assert cluster.http is not None
    return str(httpx.get(f"{cluster.http}/v1/models", timeout=10).json()["data"][0]["id"])


def test_fuzzed_inputs_get_clean_statuses_and_leave_pools_idle(
    default_cluster: Cluster, prober: Prober
) -> None:
    model = _served_model(default_cluster)
    chosen = fuzz_settings(EXAMPLES)

    @chosen
    @given(GRPC_INPUTS)
    def grpc_inputs(inp: generation_pb2.GenerateRequest | bytes) -> None:
        prober.generate(inp)

    @chosen
    @given(openai_inputs(model))
    def http_inputs(inp: HttpInput) -> None:
        prober.http(inp)

    @chosen
    @given(decode_requests())
    def decode_inputs(req: worker_pb2.DecodeRequest) -> None:
        prober.decode(req)

    @chosen
    @given(prefill_requests())
    def prefill_inputs(req: worker_pb2.PrefillRequest) -> None:
        prober.prefill(req)

    grpc_inputs()
    http_inputs()
    decode_inputs()
    if default_cluster.prefill:
        prefill_inputs()
    findings = prober.tally.findings
    assert not findings, json.dumps(findings, indent=1)[:6000]
    assert sum(prober.tally.tried.values()) >= 3 * EXAMPLES
    _assert_idle(default_cluster)
