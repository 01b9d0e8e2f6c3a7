"""Structured output end to end, over a real cluster in both modes (the first token sampled on
the prefill worker, the rest on the decode worker, disaggregated): every output sampled at
temperature 1 under a JSON schema parses and validates with ``jsonschema``; greedy constrained
output equals transformers' greedy ``generate`` under the same llguidance mask; regex, choice and
Lark constraints over HTTP (vLLM's ``structured_outputs``) and gRPC; and bad constraints are 400s
naming the problem. The decode-failover case is in ``test_fleet``."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx2 as httpx
import jsonschema
import llguidance.hf
import openai
import pytest
import torch
from llguidance import LLMatcher

from core.structured_output import GrammarKind, StructuredOutput
from pdserve.client import build_request
from pdserve.local_cluster import Cluster
from protos.pdserve.v1 import generation_pb2_grpc
from tests.e2e import reference

pytestmark = pytest.mark.e2e

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "city": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 24},
                "population": {"type": "integer", "minimum": 0, "maximum": 40000000},
            },
            "required": ["name", "population"],
            "additionalProperties": False,
        },
        "country": {"type": "string", "enum": ["France", "Japan", "Brazil", "Kenya"]},
    },
    "required": ["city", "country"],
    "additionalProperties": False,
}
ARRAYS = {
    "type": "object",
    "properties": {
        "colors": {
            "type": "array",
            "items": {"type": "string", "enum": ["red", "green", "blue", "yellow"]},
            "minItems": 1,
            "maxItems": 4,
        },
        "counts": {
            "type": "array",
            "items": {"type": "integer", "minimum": -100, "maximum": 100},
            "maxItems": 5,
        },
    },
    "required": ["colors", "counts"],
    "additionalProperties": False,
}
ENUMS = {
    "type": "object",
    "properties": {
        "status": {"enum": ["ok", "error", "pending"]},
        "retry": {"type": "boolean"},
        "attempts": {"type": "integer", "minimum": 1, "maximum": 9},
        "tags": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "key": {"type": "string", "enum": ["region", "tier"]},
                    "value": {"type": "string", "maxLength": 12},
                },
                "required": ["key", "value"],
                "additionalProperties": False,
            },
            "maxItems": 3,
        },
    },
    "required": ["status", "retry", "attempts", "tags"],
    "additionalProperties": False,
}
SCHEMAS = {"person": PERSON, "nested": NESTED, "arrays": ARRAYS, "enums": ENUMS}
ASK = "Answer with JSON only. Describe {}."
SEEDS = (11, 12, 13)


@pytest.fixture
def client(default_cluster: Cluster) -> Iterator[openai.AsyncOpenAI]:
    assert default_cluster.http is not None
    yield openai.AsyncOpenAI(base_url=f"{default_cluster.http}/v1", api_key="-", max_retries=0)


def _response_format(name: str, schema: dict[str, Any]) -> Any:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_sampled_json_always_validates(
    client: openai.AsyncOpenAI, default_cluster: Cluster, default_model_path: Path
) -> None:
    """Every schema x seed at temperature 1, all at once (one batch): 100% parse and validate,
    and each ends because its JSON value is complete (finish_reason stop)."""

    async def one(name: str, schema: dict[str, Any], seed: int) -> tuple[str, str, str | None]:
        reply = await client.chat.completions.create(
            model=str(default_model_path),
            messages=[{"role": "user", "content": ASK.format(name)}],
            response_format=_response_format(name, schema),
            temperature=1.0,
            seed=seed,
            max_tokens=300,
        )
        return name, reply.choices[0].message.content or "", reply.choices[0].finish_reason

    async def run() -> list[tuple[str, str, str | None]]:
        async with client:
            jobs = [one(n, s, seed) for n, s in SCHEMAS.items() for seed in SEEDS]
            return list(await asyncio.gather(*jobs))

    results = asyncio.run(run())
    for name, text, finish in results:
        assert finish == "stop", (name, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])
    assert all(s.free_blocks == s.total_blocks for s in default_cluster.wait_idle())


def test_streamed_json_object_parses(client: openai.AsyncOpenAI, default_model_path: Path) -> None:
    async def run() -> tuple[str, str | None]:
        async with client:
            stream = await client.chat.completions.create(
                model=str(default_model_path),
                messages=[{"role": "user", "content": "Give me a JSON object about a cat."}],
                response_format={"type": "json_object"},
                temperature=0,  # sampled, an unbounded object may not close in max_tokens
                max_tokens=300,
                stream=True,
            )
            parts, finish = [], None
            async for chunk in stream:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
            return "".join(parts), finish

    text, finish = asyncio.run(run())
    assert finish == "stop" and isinstance(json.loads(text), dict), text


class _GrammarMask:
    """A transformers logits processor enforcing an llguidance grammar: the reference for
    pdserve's constrained greedy output."""

    def __init__(self, path: Path, grammar: str, prompt_len: int, vocab: int) -> None:
        hf = reference.tokenizer(str(path))
        self.matcher = LLMatcher(llguidance.hf.from_tokenizer(hf, n_vocab=vocab), grammar)
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        new = input_ids[0, self.prompt_len :].tolist()
        if new:
            assert self.matcher.consume_token(new[-1]), self.matcher.get_error()
        mask = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        bits = ((mask[:, None] >> torch.arange(8)) & 1).flatten()[: scores.shape[-1]].bool()
        return scores.masked_fill(~bits, float("-inf"))


def test_greedy_constrained_output_equals_transformers_under_the_same_mask(
    default_cluster: Cluster, default_model_path: Path
) -> None:
    assert default_cluster.http is not None
    prompt = "The following JSON describes a city:"
    ids = reference.tokenizer(str(default_model_path))(prompt)["input_ids"]
    model = reference._model(str(default_model_path))
    vocab = model.config.vocab_size
    grammar = StructuredOutput(GrammarKind.JSON_SCHEMA, json.dumps(NESTED)).grammar()
    mask = _GrammarMask(default_model_path, grammar, len(ids), vocab)
    want = reference.greedy(default_model_path, ids, 80, logits_processor=[mask])
    eos = set(reference.tokenizer(str(default_model_path)).all_special_ids)
    while want and want[-1] in eos:  # transformers emits the EOS the finished grammar allows
        want.pop()
    text = reference.tokenizer(str(default_model_path)).decode(want)
    with openai.OpenAI(base_url=f"{default_cluster.http}/v1", api_key="-", max_retries=0) as c:
        got = c.completions.create(
            model=str(default_model_path),
            prompt=prompt,
            max_tokens=80,
            temperature=0,
            extra_body={"response_format": _response_format("city", NESTED)},
        )
    assert got.choices[0].text == text
    jsonschema.validate(json.loads(text), NESTED)


@pytest.mark.parametrize(
    ("constraint", "check"),
    [
        ({"regex": r"[0-9]{3}-[0-9]{4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t)),
        ({"choice": ["Paris", "Lyon", "Marseille"]}, lambda t: t in ("Paris", "Lyon", "Marseille")),
        (
            {"grammar": 'start: "yes" | "no" | "maybe " NUMBER\nNUMBER: /[1-9][0-9]?/'},
            lambda t: re.fullmatch(r"yes|no|maybe [1-9][0-9]?", t),
        ),
    ],
)
def test_regex_choice_and_grammar_over_http(
    default_cluster: Cluster, default_model_path: Path, constraint: dict[str, Any], check: Any
) -> None:
    body = {
        "model": str(default_model_path),
        "prompt": "The answer is",
        "max_tokens": 40,
        "temperature": 1.0,
        "seed": 3,
        "structured_outputs": constraint,
    }
    for seed in (1, 2, 3):
        reply = httpx.post(
            f"{default_cluster.http}/v1/completions", json={**body, "seed": seed}, timeout=60
        )
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        assert check(choice["text"]) and choice["finish_reason"] == "stop", choice


def test_regex_and_choice_over_grpc(default_cluster: Cluster) -> None:
    async def run(kind: str, value: Any) -> str:
        request = build_request("My favourite number is", max_tokens=20, temperature=1.0, seed=9)
        target = request.sampling.structured_output
        if kind == "choice":
            target.choice.choices.extend(value)
        else:
            setattr(target, kind, value)
        async with grpc.aio.insecure_channel(default_cluster.gateway) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            return "".join([m.text async for m in stub.Generate(request)])

    assert re.fullmatch(r"[1-9][0-9]{0,2}", asyncio.run(run("regex", "[1-9][0-9]{0,2}")))
    assert asyncio.run(run("choice", ["seven", "eleven"])) in ("seven", "eleven")

    async def refused() -> grpc.aio.AioRpcError:
        request = build_request("x", max_tokens=4)
        request.sampling.structured_output.json_schema = '{"type": "object", "properties": 3}'
        async with grpc.aio.insecure_channel(default_cluster.gateway) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                [m async for m in stub.Generate(request)]
            return info.value

    error = asyncio.run(refused())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid json_schema" in (error.details() or ""), error.details()


def test_bad_schema_is_a_400_from_the_sdk(
    default_cluster: Cluster, default_model_path: Path
) -> None:
    base = f"{default_cluster.http}/v1"
    with (
        openai.OpenAI(base_url=base, api_key="-", max_retries=0) as c,
        pytest.raises(openai.BadRequestError) as info,
    ):
        c.chat.completions.create(
            model=str(default_model_path),
            messages=[{"role": "user", "content": "hi"}],
            response_format=_response_format("bad", {"type": "object", "required": 5}),
        )
    assert "invalid json_schema" in str(info.value)
