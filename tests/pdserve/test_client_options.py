"""The SDK's generation options: build_request sets them (and only them) on the wire, the
gateway reads them back as sent, and a response's seed, sample index and cached tokens reach the
Chunk."""

from __future__ import annotations

from core.sampling import SamplingParams
from pdserve.client import build_request, chunk_from_proto
from protos.pdserve.v1 import generation_pb2
from server_runtime.proto_convert import sampling_from_proto


def test_every_option_reaches_the_gateway_as_given() -> None:
    request = build_request(
        "hi",
        max_tokens=8,
        temperature=0.0,
        repetition_penalty=1.25,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        min_p=0.125,
        min_tokens=2,
        logit_bias={7: -100.0, 3: 1.5},
        include_stop_str_in_output=True,
        stop=("x",),
    )
    assert sampling_from_proto(request.sampling) == SamplingParams(
        max_tokens=8,
        temperature=0.0,
        repetition_penalty=1.25,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        min_p=0.125,
        min_tokens=2,
        logit_bias=((3, 1.5), (7, -100.0)),
        include_stop_str_in_output=True,
        stop=("x",),
    )


def test_unset_options_stay_off_the_wire() -> None:
    sampling = build_request("hi").sampling
    for name in ("repetition_penalty", "presence_penalty", "frequency_penalty", "min_p"):
        assert not sampling.HasField(name)
    assert not sampling.HasField("min_tokens") and not sampling.logit_bias


def test_the_seed_of_the_first_message_reaches_the_chunk() -> None:
    first = generation_pb2.GenerateResponse(request_id="r", token_ids=[1], seed=2**63 - 1)
    assert chunk_from_proto(first).seed == 2**63 - 1
    assert chunk_from_proto(generation_pb2.GenerateResponse(request_id="r")).seed is None


def test_n_goes_on_the_wire_only_when_given_and_the_index_comes_back() -> None:
    assert not build_request("hi").HasField("n")
    assert build_request("hi", n=3).n == 3
    msg = generation_pb2.GenerateResponse(request_id="r", index=2)
    msg.usage.cached_tokens = 32
    chunk = chunk_from_proto(msg)
    assert (chunk.index, chunk.cached_tokens) == (2, 32)
    assert chunk_from_proto(generation_pb2.GenerateResponse()).index == 0
