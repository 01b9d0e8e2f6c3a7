"""The ``tickets`` and ``ticket_transfers`` targets: the ticket a decode worker issues, mutated
(fields and serialized bytes) and parsed as a prefill worker does (:func:`parse_ticket`), and
mutated tickets that pass those checks used by a real sender against a keyed receiver
(:class:`TicketTransferRig`: pages land only inside the reservation)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from hypothesis import strategies as st

from benchmarks.fuzz_kv_common import (
    ANSWER_S,
    FLEET,
    TEXT,
    TIDS,
    U32,
    Errors,
    Fatal,
    Finding,
    expect,
)
from benchmarks.fuzz_kv_frames import EDITS, apply_edits
from core.ticket import IncompatiblePeerError, TransferTicket, check_ticket
from kvtransfer.datapath import Backend
from kvtransfer.sender import TransferSpec
from protos.pdserve.v1 import worker_pb2
from server_runtime.proto_convert import ticket_from_proto, ticket_to_proto
from tests.kvtransfer.harness import (
    LAYERS,
    NUM_BLOCKS,
    Channel,
    Transport,
    fingerprint,
    random_pages,
    same_bits,
    tid,
)

MINE = fingerprint(Backend.ZMQ)
PROMPT_BLOCKS = 3
ENDPOINTS = [
    "tcp://127.0.0.1:5555",
    "tcp://[::1]:5555",
    "ipc:///tmp/kv.sock",
    "inproc://kv",
    "tcp://-:5",
    "tcp://127.0.0.1:99999",
    "ipc:///" + "x" * 120,
    "tcp://127.0.0.1:5555\n",
    " tcp://127.0.0.1:5555",
    "tcp://127.0.0.1",
    "udp://127.0.0.1:5555",
    "",
]
U32_FIELDS = ["block_size", "num_layers", "num_kv_heads", "head_dim", "protocol_version"]
TICKET_EDITS: dict[str, st.SearchStrategy[Any]] = {
    "transfer_id": st.binary(max_size=20),
    "kv_endpoint": st.sampled_from(ENDPOINTS) | TEXT,
    "block_ids": st.lists(U32, max_size=5),
    "lease_seconds": st.floats(width=32),
    "cached_blocks": st.integers(0, 4) | U32,
    **{
        f"fingerprint.{name}": TEXT | st.sampled_from(["xxh3-64", "aes-256-gmac", "float16"])
        for name in ["model", "dtype", "backend", "layout", "integrity"]
    },
    **{f"fingerprint.{name}": st.integers(0, 8) | U32 for name in U32_FIELDS},
}


def issued_ticket(
    transfer_id: bytes, endpoint: str, blocks: tuple[int, ...], cached: int
) -> TransferTicket:
    """A ticket as a decode worker issues it (``DecodeWorker.reserve``)."""
    return TransferTicket(transfer_id, endpoint, blocks, 30.0, MINE, cached)


@dataclass(frozen=True)
class TicketCase:
    original: bytes  # the issued ticket, serialized
    data: bytes  # what the prefill worker parses

    def __repr__(self) -> str:
        return f"TicketCase(original={self.original.hex()}, data={self.data.hex()})"


def mutate_ticket(draw: st.DrawFn, message: worker_pb2.TransferTicket, paths: list[str]) -> None:
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(paths))
        value = draw(TICKET_EDITS[path])
        target: Any = message
        name = path
        if path.startswith("fingerprint."):
            target, name = message.fingerprint, path.split(".", 1)[1]
        if name == "block_ids":
            del message.block_ids[:]
            message.block_ids.extend(value)
        else:
            setattr(target, name, value)


@st.composite
def ticket_cases(draw: st.DrawFn) -> TicketCase:
    blocks = tuple(
        draw(
            st.lists(
                st.integers(0, 63), min_size=PROMPT_BLOCKS, max_size=PROMPT_BLOCKS, unique=True
            )
        )
    )
    real = issued_ticket(draw(TIDS), ENDPOINTS[0], blocks, draw(st.integers(0, PROMPT_BLOCKS - 1)))
    message = ticket_to_proto(real)
    mutate_ticket(draw, message, list(TICKET_EDITS))
    data = message.SerializeToString()
    if draw(st.booleans()):
        data = apply_edits(
            [data],
            tuple(
                draw(st.lists(EDITS.filter(lambda e: e[0] not in ("field", "body")), max_size=3))
            ),
        )[0]
    return TicketCase(ticket_to_proto(real).SerializeToString(), data)


def parse_ticket(data: bytes) -> tuple[TransferTicket | None, str]:
    """As a prefill worker takes a ticket: protobuf, the servicer's transfer id check
    (``prefill_service.servicer``), ``check_ticket``. Only their documented refusals may come
    out; returns the ticket (None when refused) and the verdict."""
    try:
        message = worker_pb2.TransferTicket.FromString(data)
    except DecodeError:
        return None, "undecodable"
    if len(message.transfer_id) != 16:
        return None, "bad transfer id"
    ticket = ticket_from_proto(message)
    try:
        check_ticket(ticket, MINE, PROMPT_BLOCKS)
    except IncompatiblePeerError:
        return None, "refused"
    expect(ticket.fingerprint == MINE, f"accepted a ticket of another fleet: {ticket}")
    expect(len(ticket.block_ids) == PROMPT_BLOCKS, f"accepted {len(ticket.block_ids)} blocks")
    expect(0 <= ticket.cached_blocks < PROMPT_BLOCKS, f"accepted cached={ticket.cached_blocks}")
    expect(
        ticket.kv_endpoint.split("://")[0] in ("tcp", "ipc", "inproc"),
        f"accepted {ticket.kv_endpoint!r}",
    )
    expect(not any(c.isspace() for c in ticket.kv_endpoint), f"accepted {ticket.kv_endpoint!r}")
    if ticket.kv_endpoint.startswith("tcp://"):
        host, _, port = ticket.kv_endpoint[len("tcp://") :].rpartition(":")
        expect(1 <= int(port) <= 65535, f"accepted port {port}")
        expect(host.strip("[]-.") == host.strip("[]"), f"accepted host {host!r}")
    return ticket, "accepted"


def check_ticket_case(case: TicketCase) -> str:
    try:
        ticket, verdict = parse_ticket(case.data)
    except Finding:
        raise
    except Exception as exc:
        raise Finding(f"parsing a ticket raised {type(exc).__name__}: {exc}") from exc
    expect(
        ticket is not None or case.data != case.original, f"refused the issued ticket: {verdict}"
    )
    return verdict


@dataclass(frozen=True)
class TicketUse:
    """How a ticket the decode worker issued is altered before a prefill worker uses it."""

    cached: int  # the issued ticket's cached prefix blocks (not reserved for writing)
    transfer_id: int  # 0: as issued, else another id
    blocks: tuple[int, ...] | None  # another block list (None: as issued)
    cached_claimed: int | None  # another cached_blocks (None: as issued)
    endpoint: str | None  # another endpoint, which check_ticket refuses (None: as issued)


TICKET_USES = st.builds(
    TicketUse,
    st.integers(0, PROMPT_BLOCKS - 1),
    st.sampled_from([0, 0, 0, 1]),
    st.none()
    | st.lists(
        st.integers(0, 17) | st.just(2**32 - 1), min_size=PROMPT_BLOCKS, max_size=PROMPT_BLOCKS
    ).map(tuple),
    st.none() | st.integers(0, PROMPT_BLOCKS - 1),
    st.sampled_from([None] * 8 + ["tcp://-:5", "ipc:///" + "x" * 120, "tcp://127.0.0.1:99999"]),
)


class TicketTransferRig:
    """A keyed receiver (the decode worker's) and a real sender (a prefill worker's). Each
    input: a reservation, the ticket issued for it, altered, parsed as a prefill worker does
    and, when it passes, used as one does. Pages land only inside the reservation (never in
    its cached prefix); a transfer completes only with every reserved block written."""

    def __init__(self, scratch: Path) -> None:
        self.ch = Channel(
            Transport("tcp", Backend.ZMQ, scratch),
            receiver_auth=FLEET,
            ack_timeout_s=2 * ANSWER_S,
            handshake_timeout_s=1.0,
        )
        self.errors = Errors(self.ch.receiver.stats)
        self.count = 0

    def check(self, use: TicketUse) -> str:
        ch, sender = self.ch, self.ch.sender
        assert sender is not None
        self.count += 1
        rid, transfer = f"t{self.count}", tid(self.count)
        blocks = tuple((3 * self.count + i) % NUM_BLOCKS for i in range(PROMPT_BLOCKS))
        reserved = blocks[use.cached :]
        issued = issued_ticket(transfer, ch.endpoint, blocks, use.cached)
        ticket = dataclasses.replace(
            issued,
            transfer_id=tid(10**6 + self.count) if use.transfer_id else transfer,
            block_ids=use.blocks or blocks,
            cached_blocks=use.cached if use.cached_claimed is None else use.cached_claimed,
            kv_endpoint=use.endpoint or ch.endpoint,
        )
        ch.receiver.expect(transfer, rid, list(reserved), 60.0)
        before = ch.dst.kv.clone()
        try:
            taken, verdict = parse_ticket(ticket_to_proto(ticket).SerializeToString())
            expect(taken is not None or ticket != issued, f"refused the issued ticket: {verdict}")
            if taken is None:
                return verdict
            to_send = taken.blocks_to_send
            pages = random_pages(ch.receiver_fp, len(to_send), seed=self.count)
            sender.open(TransferSpec(rid, taken.transfer_id, taken.kv_endpoint, to_send))
            for layer in range(LAYERS):
                sender.send_pages(taken.transfer_id, layer, pages[layer : layer + 1])
            sender.finish(taken.transfer_id, 7)
            try:
                ok, message = ch.rec.wait_sent(rid)
            except AssertionError:
                raise Fatal("the sender never reported the transfer") from None
            if ok:  # the receiver acks, then reports
                ch.rec.wait(lambda: rid in ch.rec.ready or rid in ch.rec.failed, "a verdict")
            completed = rid in ch.rec.ready
            expect(ok == completed, f"sender says {ok} ({message}), receiver {completed}")
            if completed:
                expect(
                    taken == issued or set(to_send) == set(reserved), f"completed with {to_send}"
                )
                last = {block: i for i, block in enumerate(to_send)}  # a repeated id: the last page
                for block, i in last.items():
                    expect(
                        same_bits(ch.dst.kv[:, :, block], pages[:, :, i]),
                        f"block {block} holds other bytes",
                    )
            else:
                expect(taken != issued, f"the issued ticket's transfer failed: {message}")
            outside = [b for b in range(NUM_BLOCKS) if b not in reserved]
            expect(
                same_bits(ch.dst.kv[:, :, outside], before[:, :, outside]),
                "a block outside the reservation changed",
            )
            expect(sender.pending() == 0, "the sender still holds the transfer")
            return "completed" if completed else message.split(":")[0]
        finally:
            ch.receiver.cancel(transfer)  # what the decode worker does once the prefill failed

    def finish(self) -> None:
        expect(self.ch.receiver.pending() == 0, "reservations left")

    def close(self) -> None:
        self.ch.close()
