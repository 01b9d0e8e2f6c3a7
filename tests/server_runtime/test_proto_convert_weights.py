"""The KV fingerprint's ``weights`` field on the wire (worker.proto KVFingerprint.weights): a
ticket round-trips with it, and a ticket from a build that does not send it reads as no
weights at all, which a prefill worker then refuses naming the field."""

from __future__ import annotations

import dataclasses

import pytest

from core.ticket import Fingerprint, IncompatiblePeerError, TransferTicket, check_ticket
from protos.pdserve.v1 import worker_pb2
from server_runtime.proto_convert import ticket_from_proto, ticket_to_proto

FINGERPRINT = Fingerprint(
    model="0123456789abcdef",
    dtype="float32",
    block_size=16,
    num_layers=30,
    num_kv_heads=3,
    head_dim=64,
    backend="zmq",
)


def _ticket(fp: Fingerprint) -> TransferTicket:
    return TransferTicket(bytes(range(16)), "tcp://10.0.0.7:50081", (5, 9, 2), 60.0, fp, 1)


@pytest.mark.parametrize("weights", ["float", "gguf:Q4_1+Q8_0", "int8:q8_0"])
def test_weights_round_trip(weights: str) -> None:
    ticket = _ticket(dataclasses.replace(FINGERPRINT, weights=weights))
    msg = ticket_to_proto(ticket)
    assert msg.fingerprint.weights == weights
    wire = worker_pb2.TransferTicket.FromString(msg.SerializeToString())
    assert ticket_from_proto(wire) == ticket
    assert ticket_from_proto(wire).fingerprint.weights == weights


def test_weights_is_field_11_of_kv_fingerprint() -> None:
    field = worker_pb2.KVFingerprint.DESCRIPTOR.fields_by_name["weights"]
    assert field.number == 11 and field.type == field.TYPE_STRING


def test_a_ticket_without_weights_is_refused_naming_them() -> None:
    msg = ticket_to_proto(_ticket(FINGERPRINT))
    msg.fingerprint.ClearField("weights")  # what an older decode worker sends
    ticket = ticket_from_proto(worker_pb2.TransferTicket.FromString(msg.SerializeToString()))
    assert ticket.fingerprint.weights == ""
    with pytest.raises(IncompatiblePeerError, match="decode worker's weights is ''"):
        check_ticket(ticket, FINGERPRINT, num_prompt_blocks=3)
