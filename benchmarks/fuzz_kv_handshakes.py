"""The ``hello`` and ``welcome`` targets: HELLOs with hostile fields, and replays of them, to a
real keyed receiver (:class:`HelloRig`: welcomed exactly when fresh and this fleet's, a replay
never); WELCOMEs and REFUSEs with hostile fields and rendezvous offers, from a hostile decode
worker, to a real sender (:class:`WelcomeRig`: the handshake fails cleanly unless the answer is
sound)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from hypothesis import strategies as st

from benchmarks.fuzz_kv_common import (
    ANSWER_S,
    FLEET,
    JSON,
    NASTY_NUMBERS,
    Errors,
    Fatal,
    Finding,
    expect,
    recv_header,
)
from kvtransfer import wire
from kvtransfer.datapath import Backend
from kvtransfer.handshake import hello_fields
from kvtransfer.sender import KVSender, TransferSpec
from tests.kvtransfer.harness import (
    Channel,
    Recorder,
    Transport,
    fingerprint,
    stop_all,
    tid,
)


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()  # an edit that deletes the field
FP_FIELDS = list(fingerprint(Backend.ZMQ).to_fields())
QUOTES = "'" * 1400 + '"'  # 1.4 KB of JSON, 4.2 KB once repr()'d into a refusal's reason
HOSTILE_VALUES: st.SearchStrategy[Any] = st.sampled_from([*NASTY_NUMBERS, QUOTES]) | JSON


def _set(fields: dict[str, Any], path: str, value: Any) -> None:
    """Set (or, with MISSING, delete) ``fields[a]`` or, for a path ``a.b``, ``fields[a][b]``
    when ``fields[a]`` is an object."""
    head, _, tail = path.partition(".")
    target = fields
    if tail:
        nested = fields.get(head)
        if not isinstance(nested, dict):
            return
        target, head = nested, tail
    if value is MISSING:
        target.pop(head, None)
    else:
        target[head] = value


@dataclass(frozen=True)
class HelloCase:
    edits: tuple[tuple[str, Any], ...]  # (path, value) over the HELLO's fields
    age_s: float  # how long ago it was sent (before the edits)

    @property
    def intact(self) -> bool:
        return not self.edits and abs(self.age_s) < 60

    def fields(self, now: float) -> dict[str, Any]:
        fields = hello_fields(fingerprint(Backend.ZMQ), clock=lambda: now - self.age_s)
        for path, value in self.edits:
            _set(fields, path, value)
        return fields


HELLO_PATHS = st.sampled_from(["fingerprint", "sent_at", *(f"fingerprint.{f}" for f in FP_FIELDS)])
HELLO_CASES = st.builds(
    HelloCase,
    st.lists(st.tuples(HELLO_PATHS, HOSTILE_VALUES | st.just(MISSING)), max_size=2).map(tuple),
    st.floats(-300, 300) | st.just(0.0),
)


def fresh_and_mine(fields: dict[str, Any], now: float) -> bool:
    """What a receiver may welcome: this fleet's fingerprint, sent within two minutes."""
    mine = fingerprint(Backend.ZMQ).to_fields()
    theirs, sent = fields.get("fingerprint"), fields.get("sent_at")
    return (
        isinstance(theirs, dict)
        and all(name in theirs and theirs[name] == value for name, value in mine.items())
        and isinstance(sent, int | float)
        and not isinstance(sent, bool)
        and abs(now - sent) <= 120
    )


class HelloRig:
    """A keyed receiver; each input is a HELLO sent from a DEALER, then sent again (a replay):
    the first is welcomed exactly when it is fresh and this fleet's, the replay never is."""

    def __init__(self, scratch: Path) -> None:
        self.ch = Channel(Transport("tcp", Backend.ZMQ, scratch), receiver_auth=FLEET, sender=False)
        self.peer = self.ch.raw_peer()
        self.errors = Errors(self.ch.receiver.stats)

    def check(self, case: HelloCase) -> str:
        now = time.time()
        fields = case.fields(now)
        try:
            frame = wire.encode(
                wire.HandshakeHeader(os.urandom(16), wire.FrameKind.HELLO, fields), FLEET
            )
        except ValueError:
            return "too large to send"
        answers = []
        for _ in range(2):
            self.peer.sock.send(frame)
            answer = recv_header(self.peer.sock, FLEET, "answer to a HELLO")
            expect(isinstance(answer, wire.HandshakeHeader), f"a HELLO answered by {answer!r}")
            assert isinstance(answer, wire.HandshakeHeader)
            answers.append(answer.kind)
        welcomed = answers[0] is wire.FrameKind.WELCOME
        expect(answers[1] is wire.FrameKind.REFUSE, "a replayed HELLO was welcomed")
        expect(
            not welcomed or fresh_and_mine(json.loads(json.dumps(fields)), now),
            "welcomed a HELLO it should refuse",
        )
        expect(welcomed or not case.intact, "refused a fresh HELLO of this fleet")
        return answers[0].name

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self.ch.close()


@dataclass(frozen=True)
class WelcomeCase:
    backend: Backend
    kind: wire.FrameKind  # WELCOME or REFUSE
    edits: tuple[tuple[str, Any], ...]

    @property
    def intact(self) -> bool:
        return self.kind is wire.FrameKind.WELCOME and not self.edits


OFFER_PATHS = ["rendezvous", "rendezvous.token", "rendezvous.stream_host", "rendezvous.stream_port"]
OFFER_VALUES = {
    "rendezvous.token": st.sampled_from(["", "zz" * 16, "ab" * 15, "ab" * 17, 5]),
    "rendezvous.stream_host": st.sampled_from(["::1", "", "bad\x00host", "0.0.0.0", 7]),
    "rendezvous.stream_port": st.sampled_from([-1, 0, 65536, 2**70, "x", 1.5, "CLOSED"]),
    "rendezvous.stream_path": st.sampled_from(["", "\x00", "/", "/nonexistent/kv.sock", "x" * 200]),
}


@st.composite
def welcome_cases(draw: st.DrawFn) -> WelcomeCase:
    backend = draw(st.sampled_from([Backend.ZMQ, Backend.STREAM]))
    kind = draw(st.sampled_from([wire.FrameKind.WELCOME] * 3 + [wire.FrameKind.REFUSE]))
    paths = ["fingerprint", *(f"fingerprint.{f}" for f in FP_FIELDS), "reason"]
    paths += [*OFFER_PATHS, "rendezvous.stream_path"] if backend is Backend.STREAM else []
    edits = []
    for _ in range(draw(st.integers(0, 2))):
        path = draw(st.sampled_from(paths))
        edits.append((path, draw(OFFER_VALUES.get(path, HOSTILE_VALUES) | st.just(MISSING))))
    return WelcomeCase(backend, kind, tuple(edits))


def _drain(listener: socket.socket, records: threading.Event) -> None:
    """Take every connection to ``listener`` and read it to its end (a stream a sender joined);
    ``records`` is set once one carries more than its token's proof (a record)."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_read_to_end, args=(conn, records), daemon=True).start()


def _read_to_end(conn: socket.socket, records: threading.Event) -> None:
    with conn:
        conn.settimeout(30)
        total = 0
        try:
            while chunk := conn.recv(1 << 16):
                total += len(chunk)
                if total > 16:
                    records.set()
        except OSError:
            pass


class WelcomeRig:
    """A hostile decode worker (a ROUTER, a stream listener that reads what it is sent). Each
    input: a fresh real sender opens a transfer to it, its HELLO is answered with the input's
    WELCOME or REFUSE, and its DONE (if it handshook) with an ACK; the sender must report the
    transfer (its thread is alive), succeeding only when the answer was a WELCOME of this
    fleet."""

    def __init__(self, scratch: Path) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.router: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind("tcp://127.0.0.1:0")
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.records = threading.Event()
        threading.Thread(target=_drain, args=(self.listener, self.records), daemon=True).start()
        closed = socket.create_server(("127.0.0.1", 0))
        self.closed_port = closed.getsockname()[1]
        closed.close()
        self.rec = Recorder()
        self.errors: Errors | None = None  # each input's sender is judged by its verdict
        self.count = 0

    def fields(self, case: WelcomeCase) -> dict[str, Any]:
        fields: dict[str, Any] = {"fingerprint": fingerprint(case.backend).to_fields()}
        if case.backend is Backend.STREAM:
            port = self.listener.getsockname()[1]
            fields["rendezvous"] = {
                "stream_host": "127.0.0.1",
                "stream_port": port,
                "token": "ab" * 16,
            }
        if case.kind is wire.FrameKind.REFUSE:
            fields = {"reason": "no"}
        for path, value in case.edits:
            _set(fields, path, self.closed_port if value == "CLOSED" else value)
        return fields

    def hello(self) -> tuple[bytes, wire.Header]:
        """The next HELLO (what earlier senders sent after theirs is skipped)."""
        while self.router.poll(int(ANSWER_S * 1000)):
            identity, frame = self.router.recv_multipart()
            header = wire.decode(frame, FLEET)
            if isinstance(header, wire.HandshakeHeader) and header.kind is wire.FrameKind.HELLO:
                return identity, header
        raise Finding("the sender sent no HELLO")

    def done_sent(self, backend: Backend, rid: str, transfer: bytes) -> bool:
        """Whether the sender sent its DONE (on the ROUTER, or on the stream it joined)
        before it reported the transfer failed."""
        deadline = time.monotonic() + ANSWER_S
        while rid not in self.rec.sent and time.monotonic() < deadline:
            if backend is Backend.STREAM and self.records.wait(0.01):
                return True
            if backend is Backend.ZMQ and self.router.poll(10):
                header = wire.decode(self.router.recv_multipart()[-1], FLEET)
                if isinstance(header, wire.DoneHeader) and header.transfer_id == transfer:
                    return True
        return False

    def check(self, case: WelcomeCase) -> str:
        self.count += 1
        rid, transfer = f"w{self.count}", tid(self.count)
        fp = fingerprint(case.backend)
        sender = KVSender(
            fp, FLEET, ack_timeout_s=ANSWER_S, handshake_timeout_s=2.0, on_sent=self.rec.on_sent
        )
        sender.start()
        try:
            sender.open(TransferSpec(rid, transfer, self.endpoint, (0,)))
            sender.finish(transfer, 7)
            identity, hello = self.hello()
            fields = self.fields(case)
            try:
                reply = wire.encode(
                    wire.HandshakeHeader(hello.transfer_id, case.kind, fields), FLEET
                )
            except ValueError:
                reply = wire.encode(
                    wire.HandshakeHeader(hello.transfer_id, wire.FrameKind.REFUSE, {}), FLEET
                )
            self.records.clear()
            self.router.send_multipart([identity, reply])
            if self.done_sent(case.backend, rid, transfer):  # it handshook: acknowledge
                ack = wire.AckHeader(transfer, wire.AckStatus.OK, "")
                self.router.send_multipart([identity, wire.encode(ack, FLEET)])
            try:
                self.rec.wait(
                    lambda: rid in self.rec.sent, "the sender's verdict", timeout=3 * ANSWER_S
                )
            except AssertionError:
                raise Fatal("the sender never reported the transfer (its thread died?)") from None
            ok, message = self.rec.sent[rid][0]
            theirs = json.loads(json.dumps(fields)).get("fingerprint")
            if ok:
                expect(
                    case.kind is wire.FrameKind.WELCOME and theirs == fp.to_fields(),
                    "handshook with a WELCOME it should refuse",
                )
            expect(ok or not case.intact, f"refused an intact WELCOME: {message}")
            expect(sender.pending() == 0, "the transfer is still open")
            return "sent" if ok else message.split(":")[0]
        finally:
            stop_all([sender])

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self.router.close(linger=0)
        self.listener.close()
