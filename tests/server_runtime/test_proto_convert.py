"""server_runtime.proto_convert: core objects survive the internal protos unchanged, and unset
proto fields read as the documented defaults."""

from __future__ import annotations

import dataclasses

import pytest

from core.pool_stats import PoolStats
from core.sampling import FinishReason, SamplingParams, TokenLogprob
from core.structured_output import GrammarKind, StructuredOutput
from core.ticket import Fingerprint, IncompatiblePeerError, TransferTicket, check_ticket
from protos.pdserve.v1 import common_pb2, generation_pb2, worker_pb2
from server_runtime.proto_convert import (
    DEFAULT_MAX_TOKENS,
    FINISH_FROM_PROTO,
    FINISH_TO_PROTO,
    logprob_from_proto,
    logprob_to_proto,
    logprobs_from_proto,
    logprobs_to_proto,
    sampling_from_proto,
    sampling_to_proto,
    status_to_proto,
    ticket_from_proto,
    ticket_to_proto,
)

FINGERPRINT = Fingerprint(
    model="0123456789abcdef",
    dtype="float32",
    block_size=16,
    num_layers=30,
    num_kv_heads=3,
    head_dim=64,
    backend="stream",
    integrity="aes-256-gmac",
)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(max_tokens=7, temperature=0.0, top_k=1),
        SamplingParams(
            max_tokens=300,
            temperature=0.5,
            top_p=0.75,
            top_k=40,
            seed=2**63 - 1,
            stop=("\n\n", "END"),
            stop_token_ids=(2, 7),
            ignore_eos=True,
        ),
        SamplingParams(  # every logits processor (float32-exact values: floats on the wire)
            repetition_penalty=1.25,
            presence_penalty=-1.5,
            frequency_penalty=0.5,
            min_p=0.125,
            min_tokens=3,
            logit_bias=((0, -100.0), (17, 2.5), (4095, 100.0)),
            include_stop_str_in_output=True,
        ),
        SamplingParams(presence_penalty=2.0, frequency_penalty=-2.0, min_p=1.0),
        SamplingParams(logprobs=0),
        SamplingParams(temperature=0, logprobs=20),
    ],
)
def test_sampling_round_trips(params: SamplingParams) -> None:
    wire = common_pb2.SamplingParams.FromString(sampling_to_proto(params).SerializeToString())
    assert sampling_from_proto(wire) == params


def test_unset_sampling_fields_take_the_defaults() -> None:
    got = sampling_from_proto(common_pb2.SamplingParams())
    assert got == SamplingParams(max_tokens=DEFAULT_MAX_TOKENS)
    assert got.seed is None  # an unset seed is not seed 0


def test_neutral_processors_stay_off_the_wire() -> None:
    wire = sampling_to_proto(SamplingParams())
    for name in ("repetition_penalty", "presence_penalty", "frequency_penalty", "min_p"):
        assert not wire.HasField(name), name
    assert not wire.HasField("min_tokens") and not wire.logit_bias
    assert not wire.HasField("logprobs")  # unset: none; 0 asks for the chosen token's


def test_logprobs_round_trip_through_every_message() -> None:
    """The prefill reply (first token), the decode chunk and the public response carry
    per-token logprobs unchanged (float32-exact values: floats on the wire)."""
    lps = (
        TokenLogprob(7, -0.5, ((7, -0.5), (3, -1.25), (9, -4.0))),
        TokenLogprob(3, -12.125, ()),
        TokenLogprob(0, float("-inf"), ((5, -0.0078125),)),
    )
    reply = worker_pb2.PrefillResponse(first_token_id=7)
    reply.first_logprob.CopyFrom(logprob_to_proto(lps[0]))
    reply = worker_pb2.PrefillResponse.FromString(reply.SerializeToString())
    assert reply.HasField("first_logprob") and logprob_from_proto(reply.first_logprob) == lps[0]
    assert not worker_pb2.PrefillResponse(first_token_id=7).HasField("first_logprob")
    chunk = worker_pb2.TokenChunk(token_ids=[7, 3, 0], logprobs=logprobs_to_proto(lps))
    chunk = worker_pb2.TokenChunk.FromString(chunk.SerializeToString())
    assert logprobs_from_proto(chunk.logprobs) == lps
    response = generation_pb2.GenerateResponse(token_ids=[7, 3, 0], logprobs=logprobs_to_proto(lps))
    response = generation_pb2.GenerateResponse.FromString(response.SerializeToString())
    assert logprobs_from_proto(response.logprobs) == lps
    assert logprobs_from_proto(worker_pb2.TokenChunk(token_ids=[1]).logprobs) == ()


def test_logit_bias_arrives_sorted_by_token_id() -> None:
    wire = common_pb2.SamplingParams(logit_bias={9: 1.0, 2: -1.0})
    assert sampling_from_proto(wire).logit_bias == ((2, -1.0), (9, 1.0))


def test_seed_zero_is_kept() -> None:
    wire = sampling_to_proto(SamplingParams(seed=0))
    assert wire.HasField("seed") and sampling_from_proto(wire).seed == 0


def test_ticket_round_trips() -> None:
    ticket = TransferTicket(
        transfer_id=bytes(range(16)),
        kv_endpoint="tcp://10.0.0.7:50081",
        block_ids=(5, 9, 2, 31),
        lease_s=60.0,
        fingerprint=FINGERPRINT,
        cached_blocks=1,
    )
    wire = worker_pb2.TransferTicket.FromString(ticket_to_proto(ticket).SerializeToString())
    assert ticket_from_proto(wire) == ticket
    assert ticket_from_proto(wire).blocks_to_send == (9, 2, 31)


def test_every_fingerprint_field_is_on_the_wire() -> None:
    names = {f.name for f in dataclasses.fields(Fingerprint)}
    assert names == set(worker_pb2.KVFingerprint.DESCRIPTOR.fields_by_name)


def test_finish_reasons_map_both_ways() -> None:
    assert set(FINISH_TO_PROTO) == {None, *FinishReason}
    for reason, value in FINISH_TO_PROTO.items():
        assert FINISH_FROM_PROTO[value] is reason


def test_status_carries_the_pool_and_queue() -> None:
    stats = PoolStats(
        total_blocks=2048,
        free_blocks=2000,
        running=3,
        waiting=1,
        awaiting_kv=2,
        pool_ok=True,
        num_preemptions=0,
    )
    msg = status_to_proto("decode", "SmolLM2", stats, 16, 2, "tcp://127.0.0.1:50081")
    assert (msg.tier, msg.model, msg.block_size, msg.kv_endpoint) == (
        "decode",
        "SmolLM2",
        16,
        "tcp://127.0.0.1:50081",
    )
    assert (msg.total_blocks, msg.free_blocks, msg.running, msg.waiting) == (2048, 2000, 3, 1)
    assert msg.pending_transfers == 2 and msg.pool_ok


@pytest.mark.parametrize(
    "constraint",
    [
        StructuredOutput(GrammarKind.JSON_SCHEMA, '{"type": "object"}'),
        StructuredOutput(GrammarKind.JSON_OBJECT),
        StructuredOutput(GrammarKind.REGEX, "[0-9]+"),
        StructuredOutput(GrammarKind.CHOICE, choices=("a", "b")),
        StructuredOutput(GrammarKind.LARK, 'start: "x"'),
    ],
)
def test_structured_output_round_trips(constraint: StructuredOutput) -> None:
    params = SamplingParams(structured=constraint)
    assert sampling_from_proto(sampling_to_proto(params)) == params


def test_no_structured_output_stays_unset() -> None:
    msg = sampling_to_proto(SamplingParams())
    assert not msg.HasField("structured_output")
    assert sampling_from_proto(msg).structured is None


def _ticket(fp: Fingerprint) -> TransferTicket:
    return TransferTicket(bytes(range(16)), "tcp://10.0.0.7:50081", (5, 9, 2), 60.0, fp, 1)


@pytest.mark.parametrize("weights", ["float", "gguf:Q4_1+Q8_0", "int8:q8_0"])
def test_the_fingerprint_s_weights_round_trip(weights: str) -> None:
    ticket = _ticket(dataclasses.replace(FINGERPRINT, weights=weights))
    msg = ticket_to_proto(ticket)
    assert msg.fingerprint.weights == weights
    wire = worker_pb2.TransferTicket.FromString(msg.SerializeToString())
    assert ticket_from_proto(wire) == ticket
    field = worker_pb2.KVFingerprint.DESCRIPTOR.fields_by_name["weights"]
    assert field.number == 11 and field.type == field.TYPE_STRING


def test_a_ticket_without_weights_is_refused_naming_them() -> None:
    """What a decode worker built before the field sends: no weights, refused by name."""
    msg = ticket_to_proto(_ticket(FINGERPRINT))
    msg.fingerprint.ClearField("weights")
    ticket = ticket_from_proto(worker_pb2.TransferTicket.FromString(msg.SerializeToString()))
    assert ticket.fingerprint.weights == ""
    with pytest.raises(IncompatiblePeerError, match="decode worker's weights is ''"):
        check_ticket(ticket, FINGERPRINT, num_prompt_blocks=3)
