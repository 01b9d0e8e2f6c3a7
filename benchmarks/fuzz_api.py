"""Property-based fuzzing of pdserve's APIs against a real local cluster (hypothesis).

    .venv/bin/python benchmarks/fuzz_api.py --examples 300 [--mode disaggregated|colocated]
                                            [--json fuzz.json]

Four targets, ``--examples`` inputs each: the gateway's ``Generation/Generate`` (generated
``GenerateRequest`` messages, some sent as raw, undecodable bytes), its OpenAI-compatible HTTP
API (JSON bodies, some not objects, not JSON or not UTF-8, with odd content types), and the
workers' ``Decode/Generate`` and ``Prefill/Prefill`` straight (token ids outside the vocabulary,
NaN and huge floats, bad tickets). An answer is a *finding* when it is UNKNOWN, INTERNAL,
DATA_LOSS or HTTP 5xx, when an INVALID_ARGUMENT / 4xx has no message, or when the healthy
gateway blames its fleet (UNAVAILABLE / 503). After each target every worker pool must be idle
again. Prints a summary (inputs tried, answers by status, findings with the input that caused
them); ``--json`` writes it too. Exits 1 when there are findings.

Why hypothesis: its strategies build typed, structured inputs (protobuf messages, JSON
objects) that reach past the parsers into validation and the engine, where byte mutators
(atheris, libprotobuf-mutator) mostly stop at the decoder, and it runs in-process with no
instrumented build. tests/e2e/test_hostile_input.py runs the same strategies as a short CI smoke.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx2 as httpx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from engine.config import ModelConfig
from engine.model_files import default_cache_dir, resolve_model_path
from pdserve.local_cluster import free_port_range, start_cluster
from protos.pdserve.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

GENERATE = "/pdserve.v1.Generation/Generate"
CALL_TIMEOUT_S = 60.0
FORBIDDEN = frozenset(
    {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}
)
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
VOCABISH = st.integers(0, 60_000)  # the default model has 49,152: some ids fall outside
FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)
NICE_FLOATS = st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0, 1e-45, 3e38])
TEXT = st.text(max_size=24)
# either cheap to generate, or refused for the context length: never a long completion
MAX_TOKENS = st.one_of(st.integers(0, 3), st.integers(2**20, 2**32 - 1))


# ---- strategies ---------------------------------------------------------------------------
#
# Every input is drawn in one of three moods: all fields valid (so requests are served and the
# engine runs), one field hostile (the validation path of that field), or all hostile. Each
# field has a (valid, hostile) pair of strategies.

VOCAB = 49_152  # the default model's; ids past it are hostile
VALID_IDS = st.integers(0, VOCAB - 1)
NICE_TEXT = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=16
)
Pair = tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]


@st.composite
def moods(draw: st.DrawFn, fields: list[str]) -> frozenset[str]:
    """The fields to draw hostile: none, one, or all."""
    mood = draw(st.sampled_from(["valid", "valid", "one", "one", "all"]))
    if mood == "valid":
        return frozenset()
    if mood == "one":
        return frozenset({draw(st.sampled_from(fields))})
    return frozenset(fields)


def _draw_fields(draw: st.DrawFn, pairs: dict[str, Pair]) -> dict[str, Any]:
    """One value per field (None: leave it unset), hostile for the fields the mood picked."""
    hostile = draw(moods(sorted(pairs)))
    return {
        name: draw(pair[1] if name in hostile else _maybe(pair[0])) for name, pair in pairs.items()
    }


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


@st.composite
def structured_outputs(draw: st.DrawFn, valid: bool) -> common_pb2.StructuredOutput:
    msg = common_pb2.StructuredOutput()
    if valid:
        choice = draw(st.sampled_from(["json_object", "regex", "choice", "grammar"]))
        if choice == "json_object":
            msg.json_object = True
        elif choice == "regex":
            msg.regex = draw(st.sampled_from(["[a-z]{1,3}", "(yes|no)", "[0-9]+"]))
        elif choice == "choice":
            msg.choice.choices.extend(draw(st.lists(NICE_TEXT, min_size=1, max_size=3)))
        else:
            msg.grammar = 'start: "yes" | "no"'
        return msg
    kind = draw(st.sampled_from(["json_schema", "json_object", "regex", "choice", "grammar"]))
    if kind == "json_object":
        msg.json_object = draw(st.booleans())
    elif kind == "choice":
        msg.choice.choices.extend(draw(st.lists(TEXT, max_size=4)))
    else:
        known = {
            "json_schema": ['{"type": "object"}', '{"type": "integer"}', "{", "[]", "true"],
            "regex": ["[a-z]+", "(", "a{2,1}", ""],
            "grammar": ['start: "yes" | "no"', "start:", "nonsense"],
        }[kind]
        setattr(msg, kind, draw(st.one_of(st.sampled_from(known), TEXT)))
    return msg


def _floats(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(low, high, width=32)


SAMPLING_FIELDS: dict[str, Pair] = {
    "max_tokens": (st.integers(1, 3), MAX_TOKENS),
    "temperature": (_floats(0, 2), st.one_of(NICE_FLOATS, FLOATS)),
    "top_p": (_floats(0.0625, 1), st.one_of(NICE_FLOATS, FLOATS)),
    "top_k": (st.integers(0, 50), U32),
    "seed": (U64, U64),
    "repetition_penalty": (_floats(0.5, 2.0), st.one_of(NICE_FLOATS, FLOATS)),
    "presence_penalty": (_floats(-2, 2), st.one_of(NICE_FLOATS, FLOATS)),
    "frequency_penalty": (_floats(-2, 2), st.one_of(NICE_FLOATS, FLOATS)),
    "min_p": (_floats(0, 1), st.one_of(NICE_FLOATS, FLOATS)),
    "min_tokens": (st.integers(0, 1), U32),
    "logprobs": (st.integers(0, 5), U32),
    "stop": (st.lists(NICE_TEXT, max_size=3), st.lists(TEXT, max_size=20)),
    "stop_token_ids": (
        st.lists(VALID_IDS, max_size=3),
        st.lists(st.one_of(VOCABISH, U32), max_size=4),
    ),
    "logit_bias": (
        st.dictionaries(VALID_IDS, _floats(-100, 100), max_size=3),
        st.dictionaries(st.one_of(VOCABISH, U32), FLOATS, max_size=4),
    ),
    "ignore_eos": (st.booleans(), st.booleans()),
    "include_stop_str_in_output": (st.booleans(), st.booleans()),
    "structured_output": (
        st.one_of(st.none(), structured_outputs(True)),
        structured_outputs(False),
    ),
}


@st.composite
def sampling_params(draw: st.DrawFn) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(max_tokens=2)
    for name, value in _draw_fields(draw, SAMPLING_FIELDS).items():
        if value is None:
            continue
        if name in ("stop", "stop_token_ids"):
            getattr(msg, name).extend(value)
        elif name == "logit_bias":
            msg.logit_bias.update(value)
        elif name == "structured_output":
            msg.structured_output.CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


REQUEST_IDS = st.one_of(
    st.just(""),
    st.text(max_size=20),  # newlines, spaces, non-ASCII
    st.sampled_from(["x" * 129, "y" * 9000]),
)
VALID_IDS_TEXT = st.from_regex(r"[!-~]{1,40}", fullmatch=True)
ROLES = st.sampled_from(["system", "user", "assistant", "tool", "", "bogus"])
VALID_ROLES = st.sampled_from(["system", "user", "assistant"])


@st.composite
def _messages(draw: st.DrawFn, valid: bool) -> list[tuple[str, str]]:
    if valid:
        return draw(
            st.lists(st.tuples(VALID_ROLES, NICE_TEXT), min_size=1, max_size=3).map(
                lambda ms: [*ms[:-1], ("user", ms[-1][1])]
            )
        )
    return draw(st.lists(st.tuples(ROLES, TEXT), max_size=3))


@st.composite
def generate_requests(draw: st.DrawFn) -> generation_pb2.GenerateRequest:
    """GenerateRequest messages, valid and not: no input, two inputs, ids outside the
    vocabulary, empty messages, bad request ids, every sampling field at random."""
    fields: dict[str, Pair] = {
        "request_id": (VALID_IDS_TEXT, REQUEST_IDS),
        "input": (
            st.sampled_from(["prompt", "ids", "messages"]).map(lambda k: {k}),
            st.sets(st.sampled_from(["prompt", "ids", "messages"]), max_size=3),
        ),
        "n": (st.integers(1, 3), st.one_of(st.just(0), st.integers(17, 2**32 - 1))),
    }
    hostile = draw(moods(["request_id", "input", "n", "values"]))
    req = generation_pb2.GenerateRequest()
    rid = draw(fields["request_id"][1] if "request_id" in hostile else fields["request_id"][0])
    req.request_id = rid
    inputs = draw(fields["input"][1] if "input" in hostile else fields["input"][0])
    bad = "values" in hostile
    if "prompt" in inputs:
        req.prompt = draw(TEXT if bad else NICE_TEXT)
    if "ids" in inputs:
        ids = (
            st.lists(st.one_of(VOCABISH, U32), max_size=12)
            if bad
            else st.lists(VALID_IDS, min_size=1, max_size=12)
        )
        req.prompt_token_ids.extend(draw(ids))
    if "messages" in inputs:
        for role, content in draw(_messages(not bad)):
            req.messages.add(role=role, content=content)
    req.sampling.CopyFrom(draw(sampling_params()))
    n = draw(fields["n"][1] if "n" in hostile else _maybe(fields["n"][0]))
    if n is not None:
        req.n = n
    return req


JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=8,
)
OPENAI_FIELDS: dict[str, Pair] = {
    "max_tokens": (st.integers(1, 3), st.one_of(MAX_TOKENS, JSON_LEAVES)),
    "temperature": (st.floats(0, 2), st.one_of(NICE_FLOATS, JSON_LEAVES)),
    "top_p": (st.floats(0.05, 1), st.one_of(NICE_FLOATS, JSON_LEAVES)),
    "top_k": (st.integers(-1, 50), st.one_of(st.integers(-5, 2**70), JSON_LEAVES)),
    "n": (st.integers(1, 3), st.one_of(st.integers(-1, 2**40), JSON_LEAVES)),
    "seed": (st.integers(0, 2**63), st.one_of(st.integers(-5, 2**65), JSON_LEAVES)),
    "stop": (
        st.lists(NICE_TEXT, max_size=3),
        st.one_of(TEXT, st.lists(TEXT, max_size=20), JSON_LEAVES),
    ),
    "stream": (st.booleans(), JSON_LEAVES),
    "logprobs": (st.integers(0, 5), st.one_of(st.integers(-1, 25), JSON_LEAVES)),
    "logit_bias": (
        st.dictionaries(VALID_IDS.map(str), st.floats(-100, 100), max_size=3),
        st.one_of(
            st.dictionaries(st.from_regex(r"-?[0-9]{1,7}", fullmatch=True), FLOATS, max_size=3),
            JSON_VALUES,
        ),
    ),
    "presence_penalty": (st.floats(-2, 2), st.one_of(NICE_FLOATS, JSON_LEAVES)),
    "frequency_penalty": (st.floats(-2, 2), st.one_of(NICE_FLOATS, JSON_LEAVES)),
    "repetition_penalty": (st.floats(0.5, 2), st.one_of(NICE_FLOATS, JSON_LEAVES)),
    "min_tokens": (st.integers(0, 1), st.one_of(st.integers(-1, 2**40), JSON_LEAVES)),
    "stop_token_ids": (
        st.lists(VALID_IDS, max_size=3),
        st.one_of(st.lists(st.integers(-1, 2**33), max_size=3), JSON_VALUES),
    ),
    "response_format": (
        st.sampled_from([{"type": "json_object"}, {"type": "text"}]),
        st.one_of(
            st.sampled_from([{"type": "nope"}, {"type": "json_schema"}]),
            st.builds(
                lambda schema: {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": schema},
                },
                JSON_VALUES,
            ),
            JSON_VALUES,
        ),
    ),
    "frobnicate": (st.nothing(), JSON_VALUES),
}
CONTENT_TYPES = st.sampled_from(
    ["application/json", "application/json; charset=utf-8", "text/plain", "", "multipart/form-data"]
)


@dataclass(frozen=True)
class HttpInput:
    path: str
    body: bytes
    content_type: str


def _valid_messages() -> st.SearchStrategy[list[dict[str, str]]]:
    return _messages(True).map(lambda ms: [{"role": r, "content": c} for r, c in ms])


@st.composite
def openai_inputs(draw: st.DrawFn, model: str) -> HttpInput:
    """OpenAI bodies for the completions, chat and tokenizer routes: valid objects, objects
    with hostile field values, and bodies that are not objects, not JSON, not UTF-8, or
    nested deeply."""
    path = draw(
        st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
    )
    shape = draw(st.integers(0, 9))
    if shape == 0:
        body = draw(st.binary(max_size=40))
    elif shape == 1:
        body = json.dumps(draw(JSON_VALUES)).encode()
    elif shape == 2:
        depth = draw(st.sampled_from([200, 5_000, 100_000]))
        body = (b"[" * depth) + (b"]" * depth)
    else:
        body = json.dumps(draw(_openai_object(path, model)), allow_nan=True).encode()
    content_type = "application/json" if shape > 3 else draw(CONTENT_TYPES)
    return HttpInput(path, body, content_type)


@st.composite
def _openai_object(draw: st.DrawFn, path: str, model: str) -> dict[str, Any]:
    hostile = draw(moods(["model", "input", *OPENAI_FIELDS]))
    obj: dict[str, Any] = {"model": draw(JSON_LEAVES) if "model" in hostile else model}
    bad_input = "input" in hostile
    if path == "/v1/chat/completions" or (path == "/tokenize" and draw(st.booleans())):
        hostile_messages = st.lists(
            st.fixed_dictionaries(
                {"role": st.one_of(ROLES, JSON_LEAVES)},
                optional={"content": st.one_of(TEXT, JSON_VALUES)},
            ),
            max_size=3,
        )
        obj["messages"] = draw(
            st.one_of(hostile_messages, JSON_VALUES) if bad_input else _valid_messages()
        )
    elif path == "/detokenize":
        hostile_tokens = st.one_of(st.lists(st.integers(-1, 2**40), max_size=6), JSON_VALUES)
        obj["tokens"] = draw(hostile_tokens if bad_input else st.lists(VALID_IDS, max_size=6))
    else:
        valid_prompt = st.one_of(NICE_TEXT, st.lists(VALID_IDS, min_size=1, max_size=8))
        hostile_prompt = st.one_of(TEXT, st.lists(st.integers(-1, 60_000), max_size=8), JSON_VALUES)
        obj["prompt"] = draw(hostile_prompt if bad_input else valid_prompt)
    if path.startswith("/v1/"):
        for name, (valid, bad) in OPENAI_FIELDS.items():
            value = draw(bad if name in hostile else _maybe(valid))
            if value is not None:
                obj[name] = value
        obj.setdefault("max_tokens", 2)
    return obj


def _fingerprint(draw: st.DrawFn) -> worker_pb2.KVFingerprint:
    return worker_pb2.KVFingerprint(
        model=draw(TEXT),
        dtype=draw(st.sampled_from(["float32", "bfloat16", "", "int4"])),
        block_size=draw(st.one_of(st.just(16), U32)),
        num_layers=draw(st.one_of(st.just(30), U32)),
        num_kv_heads=draw(U32),
        head_dim=draw(U32),
        backend=draw(TEXT),
        integrity=draw(TEXT),
        layout=draw(TEXT),
        protocol_version=draw(U32),
    )


@st.composite
def tickets(draw: st.DrawFn) -> worker_pb2.TransferTicket:
    return worker_pb2.TransferTicket(
        transfer_id=draw(st.one_of(st.binary(min_size=16, max_size=16), st.binary(max_size=20))),
        kv_endpoint=draw(
            st.one_of(st.sampled_from(["tcp://127.0.0.1:1", "ipc:///nope", ""]), TEXT)
        ),
        block_ids=draw(st.lists(U32, max_size=6)),
        lease_seconds=draw(FLOATS),
        cached_blocks=draw(U32),
        fingerprint=_fingerprint(draw),
    )


def _worker_prompt(draw: st.DrawFn) -> list[int]:
    bad = draw(st.booleans())
    return draw(
        st.lists(st.one_of(VOCABISH, U32), max_size=12)
        if bad
        else st.lists(VALID_IDS, min_size=1, max_size=12)
    )


@st.composite
def decode_requests(draw: st.DrawFn) -> worker_pb2.DecodeRequest:
    """Straight to a decode worker, LOCAL mode (REMOTE would wait for pages until its lease)."""
    return worker_pb2.DecodeRequest(
        request_id=draw(VALID_IDS_TEXT),
        prompt_token_ids=_worker_prompt(draw),
        sampling=draw(sampling_params()),
        mode=worker_pb2.PREFILL_MODE_LOCAL,
        resumed_tokens=draw(st.one_of(st.integers(0, 3), U32)),
    )


@st.composite
def prefill_requests(draw: st.DrawFn) -> worker_pb2.PrefillRequest:
    return worker_pb2.PrefillRequest(
        request_id=draw(VALID_IDS_TEXT),
        prompt_token_ids=_worker_prompt(draw),
        sampling=draw(sampling_params()),
        ticket=draw(tickets()),
        resumed_tokens=draw(st.one_of(st.integers(0, 3), U32)),
    )


# ---- judging answers ----------------------------------------------------------------------


def grpc_finding(
    code: grpc.StatusCode, details: str, *, fleet_is_healthy: bool = True
) -> str | None:
    """What is wrong with a gRPC answer, or None when it is a clean status."""
    if code in FORBIDDEN:
        return f"{code.name}: {details}"
    if code is grpc.StatusCode.INVALID_ARGUMENT and not details.strip():
        return "INVALID_ARGUMENT without a message"
    if fleet_is_healthy and code is grpc.StatusCode.UNAVAILABLE:
        return f"UNAVAILABLE from a healthy fleet: {details}"
    return None


def http_finding(status: int, body: bytes) -> str | None:
    """What is wrong with an HTTP answer, or None when it is clean."""
    if status >= 500:
        return f"HTTP {status}: {body[:300]!r}"
    if 400 <= status < 500:
        try:
            message = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return f"HTTP {status} without an OpenAI error body: {body[:300]!r}"
        if not isinstance(message, str) or not message.strip():
            return f"HTTP {status} with an empty message"
    if status == 200 and b'"error"' in body and b"data: " in body:
        for line in body.split(b"\n"):
            if line.startswith(b"data: {") and b'"error"' in line:
                event = json.loads(line[6:])
                if "error" in event and event["error"].get("type") == "server_error":
                    return f"stream error event: {event['error']}"
    return None


def _one_reply(method: Callable[..., Any], request: Any) -> list[Any]:
    return [method(request, timeout=CALL_TIMEOUT_S)]


def _raw(payload: bytes) -> Callable[[object], bytes]:
    return lambda _: payload


@dataclass
class Tally:
    """Inputs tried and answers seen per target; findings with their inputs."""

    tried: Counter[str] = field(default_factory=Counter)
    answers: Counter[str] = field(default_factory=Counter)
    findings: list[dict[str, str]] = field(default_factory=list)

    def record(self, target: str, answer: str, finding: str | None, shown: str) -> None:
        self.tried[target] += 1
        self.answers[f"{target} {answer}"] += 1
        if finding is not None:
            self.findings.append({"target": target, "finding": finding, "input": shown[:500]})


class Prober:
    """Sends one input to one target and judges the answer (sync gRPC and HTTP clients)."""

    def __init__(self, gateway: str, http: str | None, prefill: list[str], decode: list[str]):
        self.tally = Tally()
        self._channels = {a: grpc.insecure_channel(a) for a in [gateway, *prefill, *decode]}
        self._gateway = gateway
        self._prefill, self._decode = prefill, decode
        self._http = httpx.Client(base_url=http, timeout=CALL_TIMEOUT_S) if http else None

    @property
    def has_http(self) -> bool:
        return self._http is not None

    @property
    def has_prefill(self) -> bool:
        return bool(self._prefill)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        if self._http is not None:
            self._http.close()

    def _stream(self, target: str, call: Callable[[], Any], shown: str, healthy: bool) -> None:
        try:
            for _ in call():
                pass
            answer, finding = "OK", None
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            answer = code.name
            finding = grpc_finding(code, exc.details() or "", fleet_is_healthy=healthy)  # type: ignore[attr-defined]
        except Exception as exc:  # the client library refusing the input is not a finding
            answer, finding = f"client:{type(exc).__name__}", None
        self.tally.record(target, answer, finding, shown)

    def generate(self, inp: generation_pb2.GenerateRequest | bytes) -> None:
        """A message, or raw bytes sent as one."""
        channel = self._channels[self._gateway]
        if isinstance(inp, bytes):
            method = channel.unary_stream(GENERATE, request_serializer=_raw(inp))
            call = lambda: method(None, timeout=CALL_TIMEOUT_S)  # noqa: E731
        else:
            stub = generation_pb2_grpc.GenerationStub(channel)
            call = lambda: stub.Generate(inp, timeout=CALL_TIMEOUT_S)  # noqa: E731
        self._stream("grpc", call, repr(inp) if isinstance(inp, bytes) else str(inp), True)

    def decode(self, request: worker_pb2.DecodeRequest) -> None:
        for address in self._decode:
            stub = worker_pb2_grpc.DecodeStub(self._channels[address])
            call = functools.partial(stub.Generate, request, timeout=CALL_TIMEOUT_S)
            self._stream("decode", call, str(request), healthy=True)

    def prefill(self, request: worker_pb2.PrefillRequest) -> None:
        for address in self._prefill:
            stub = worker_pb2_grpc.PrefillStub(self._channels[address])
            call = functools.partial(_one_reply, stub.Prefill, request)
            # a bad ticket may fail its transfer: UNAVAILABLE is a clean answer here
            self._stream("prefill", call, str(request), healthy=False)

    def http(self, inp: HttpInput) -> None:
        assert self._http is not None, "the cluster has no HTTP API"
        headers = {"content-type": inp.content_type} if inp.content_type else {}
        shown = f"{inp.path} {inp.content_type!r} {inp.body[:400]!r}"
        try:
            reply = self._http.post(inp.path, content=inp.body, headers=headers)
            answer, finding = str(reply.status_code), http_finding(reply.status_code, reply.content)
        except httpx.HTTPError as exc:
            answer, finding = f"client:{type(exc).__name__}", f"HTTP transport error: {exc}"
        self.tally.record("http", answer, finding, shown)


def fuzz_settings(examples: int) -> settings:
    """hypothesis settings for a run against live processes: no deadline, no shrinking (a
    finding is recorded with its input, not raised), no example database."""
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=(Phase.generate,),
        suppress_health_check=list(HealthCheck),
    )


GRPC_INPUTS = st.one_of(generate_requests(), st.binary(min_size=1, max_size=16))
"""Messages, and now and then raw bytes (most of which do not decode)."""


def run_all(prober: Prober, examples: int, model: str, idle: Callable[[], bool]) -> None:
    """Every target, ``examples`` inputs each, then the pools must be idle."""
    chosen = fuzz_settings(examples)

    @chosen
    @given(GRPC_INPUTS)
    def grpc_target(inp: generation_pb2.GenerateRequest | bytes) -> None:
        prober.generate(inp)

    @chosen
    @given(openai_inputs(model))
    def http_target(inp: HttpInput) -> None:
        prober.http(inp)

    @chosen
    @given(decode_requests())
    def decode_target(request: worker_pb2.DecodeRequest) -> None:
        prober.decode(request)

    @chosen
    @given(prefill_requests())
    def prefill_target(request: worker_pb2.PrefillRequest) -> None:
        prober.prefill(request)

    targets = [grpc_target, decode_target]
    if prober.has_http:
        targets.append(http_target)
    if prober.has_prefill:
        targets.append(prefill_target)
    for target in targets:
        started = time.monotonic()
        target()
        if not idle():
            prober.tally.findings.append(
                {"target": target.__name__, "finding": "pools not idle afterwards", "input": ""}
            )
        print(f"{target.__name__}: {time.monotonic() - started:.0f} s", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200, help="inputs per target")
    parser.add_argument("--mode", choices=["disaggregated", "colocated"], default="disaggregated")
    parser.add_argument("--model", default=None, help="model folder (default: the default model)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = parser.parse_args()

    model = args.model or str(resolve_model_path(ModelConfig(cache_dir=default_cache_dir())))
    logs = Path(tempfile.mkdtemp(prefix="pdserve-fuzz-"))
    cluster = start_cluster(
        model,
        prefill=1 if args.mode == "disaggregated" else 0,
        decode=1,
        log_dir=logs,
        http_port=free_port_range(1),
    )
    started = time.monotonic()
    prober = Prober(cluster.gateway, cluster.http, cluster.prefill, cluster.decode)
    try:
        served = httpx.get(f"{cluster.http}/v1/models", timeout=10).json()["data"][0]["id"]
        run_all(prober, args.examples, served, lambda: _idle(cluster.wait_idle(30)))
        retried = len(cluster.events("request_retrying")) + len(cluster.events("stream_resuming"))
    finally:
        prober.close()
        cluster.stop()
    tally = prober.tally
    summary = {
        "mode": args.mode,
        "examples_per_target": args.examples,
        "seconds": round(time.monotonic() - started, 1),
        "tried": dict(tally.tried),
        "answers": dict(sorted(tally.answers.items())),
        "retries_logged": retried,
        "findings": tally.findings,
        "logs": str(logs),
    }
    print(json.dumps(summary, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    return 1 if tally.findings else 0


def _idle(statuses: list[worker_pb2.WorkerStatus]) -> bool:
    return all(
        s.free_blocks == s.total_blocks and s.running == 0 and s.waiting == 0 and s.pool_ok
        for s in statuses
    )


if __name__ == "__main__":
    sys.exit(main())
