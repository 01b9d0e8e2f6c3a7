"""The attack targets' rigs: a receiver under attack (:class:`AttackRig`: a stranger's DEALER,
rogue connections, and the verdict on each transfer), fed by a real sender through a tampering
:class:`~benchmarks.fuzz_kv_attack_cases.Relay` (:class:`ZmqRig`) or by a handshaken peer
whose stream carries tampered or unreadable records (:class:`StreamRig`)."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from benchmarks.fuzz_kv_attack_cases import (
    Attack,
    Relay,
    Rogue,
    alter,
    arrange,
    page_message,
    recv_ack,
)
from benchmarks.fuzz_kv_common import (
    ANSWER_S,
    SEALERS,
    VERIFIERS,
    Errors,
    Fatal,
    Finding,
    expect,
    recv_header,
)
from kvtransfer import wire
from kvtransfer.datapath import Backend, StreamLink, join_pair
from kvtransfer.sender import TransferSpec
from tests.kvtransfer.harness import (
    GROUP_TIMEOUT_S,
    LAYERS,
    NOBODY,
    NUM_BLOCKS,
    Channel,
    Transport,
    random_pages,
    same_bits,
    tid,
)


class AttackRig:
    """A receiver under attack (the shared part of the zmq and stream rigs): a stranger's
    DEALER, rogue connections, and the verdict on one transfer under attack."""

    def __init__(self, transport: Transport, auth_name: str, **channel: Any) -> None:
        self.auth = VERIFIERS[auth_name]
        self.ch = Channel(transport, receiver_auth=self.auth, **channel)
        self.stranger = self.ch.raw_peer()  # never handshakes (its replayed HELLO is refused)
        self.captured: list[list[bytes]] = []  # every message of the genuine sender, in order
        self.hello = b""  # the genuine sender's HELLO, once sent
        self.stream_address: dict[str, Any] = {}
        self.live: bytes | None = None
        self.errors = Errors(self.ch.receiver.stats)
        self.count = 0
        self.stranger_is_peer = False  # welcomed: it replayed a HELLO on an unkeyed channel

    def capture(self, message: list[bytes]) -> None:
        self.captured.append(message)
        del self.captured[:-64]

    def rogue(self, rogue: Rogue, transfer: bytes, blocks: list[int], pages: Any) -> None:
        sealer = SEALERS[rogue.sealer]
        if rogue.what == "garbage":
            self.stranger.sock.send(rogue.data)
        elif rogue.what == "forged":
            headers: list[wire.Header] = [
                wire.DoneHeader(transfer, 7, LAYERS),
                wire.AbortHeader(transfer, "forged"),
            ]
            out_of_band = Backend(self.ch.receiver_fp.backend).out_of_band
            messages = [page_message(transfer, pages[:1], blocks, sealer, out_of_band)]
            messages += [[wire.encode(header, sealer)] for header in headers]
            self.stranger.sock.send_multipart(messages[len(rogue.data) % 3])
        elif rogue.what == "hello":
            self.stranger.sock.send(self.hello)
            self.stranger_is_peer |= self.auth.key is None  # no key: nothing tells it apart
        elif rogue.what == "live":
            deadline = time.monotonic() + ANSWER_S
            while (
                not any(m[0][8:24] == transfer for m in self.captured)
                and time.monotonic() < deadline
            ):
                time.sleep(0.002)
            live = [m for m in self.captured if m[0][8:24] == transfer]
            self.stranger.sock.send_multipart(live[len(rogue.data) % len(live)] if live else [b"x"])
        else:  # raw bytes on a TCP connection to the control port or the stream listener
            if rogue.what == "tcp":
                host, port = self.ch.endpoint[len("tcp://") :].rsplit(":", 1)
                address: tuple[str, int] = (host, int(port))
            else:
                address = (self.stream_address["stream_host"], self.stream_address["stream_port"])
            with socket.create_connection(address, timeout=ANSWER_S) as conn:
                conn.sendall(rogue.data)

    def sync(self) -> None:
        """Once the receiver has handled all the stranger sent."""
        self.stranger.sock.send(wire.encode(wire.DoneHeader(NOBODY, 7, LAYERS), self.auth))
        recv_ack(self.stranger.sock, self.auth, NOBODY)

    def judge(
        self, attack: Attack, rid: str, blocks: list[int], pages: Any, before: Any, harmless: bool
    ) -> str:
        rec, receiver = self.ch.rec, self.ch.receiver
        try:
            rec.wait(lambda: rid in rec.ready or rid in rec.failed, "a verdict", timeout=ANSWER_S)
        except AssertionError:
            raise Finding("the reservation got no verdict") from None
        completed = rid in rec.ready
        expect(
            len(rec.ready.get(rid, [])) + len(rec.failed.get(rid, [])) == 1,
            f"two verdicts for {rid}",
        )
        expect(receiver.pending() == 0, f"{receiver.pending()} reservations left pending")
        outside = [b for b in range(NUM_BLOCKS) if b not in blocks]
        expect(
            same_bits(self.ch.dst.kv[:, :, outside], before[:, :, outside]),
            "a block outside the reservation changed",
        )
        # a buggy fleet member may write anything (but nowhere else); so may a stranger that
        # is a peer (see ``stranger_is_peer``) replaying the live transfer's frames
        replaying_peer = self.stranger_is_peer and any(r.what == "live" for r in attack.rogues)
        strict = not attack.reseal and not replaying_peer
        if strict and harmless:
            expect(
                completed,
                f"an attack it should shrug off failed the transfer: {rec.failed.get(rid)}",
            )
            expect(same_bits(self.ch.dst.kv[:, :, blocks], pages), "completed with other bytes")
        elif strict:
            expect(not completed, "completed without one of its genuine messages")
        return (
            "completed"
            if completed
            else rec.failed[rid][0].removeprefix("KV transfer failed: ").split(":")[0]
        )

    def finish(self) -> None:
        """The receiver still serves: a genuine transfer from a new sender completes."""
        count = self.count + 1
        blocks = [(2 * count + i) % NUM_BLOCKS for i in range(2)]
        pages = random_pages(self.ch.receiver_fp, 2, seed=count)
        self.ch.receiver.expect(tid(count), "last", blocks, 60.0)
        sender = self.ch.sender or self.ch.start_sender()
        sender.open(TransferSpec("last", tid(count), self.ch.endpoint, tuple(blocks)))
        self.ch.push(tid(count), pages)
        sender.finish(tid(count), 7)
        try:
            expect(self.ch.rec.wait_sent("last") == (True, ""), "the last genuine transfer failed")
        except AssertionError as exc:
            raise Fatal(f"the receiver stopped serving: {exc}") from None
        expect(same_bits(self.ch.dst.kv[:, :, blocks], pages), "the last transfer's pages differ")
        expect(self.ch.receiver.pending() == 0, "reservations left pending")

    def close(self) -> None:
        self.ch.close()

    def next_transfer(self) -> tuple[str, bytes, list[int], Any, Any]:
        self.count += 1
        blocks = [(2 * self.count + i) % NUM_BLOCKS for i in range(2)]
        return (
            f"x{self.count}",
            tid(self.count),
            blocks,
            random_pages(self.ch.receiver_fp, 2, seed=self.count),
            self.ch.dst.kv.clone(),
        )


class ZmqRig(AttackRig):
    """A real sender and receiver (zmq backend) with a :class:`Relay` between them that
    tampers with one message of each transfer and sends the sender hostile replies."""

    def __init__(self, auth_name: str, scratch: Path) -> None:
        super().__init__(
            Transport("tcp", Backend.ZMQ, scratch),
            auth_name,
            ack_timeout_s=3 * ANSWER_S,
            handshake_timeout_s=ANSWER_S,
        )
        self.relay = Relay(self.ch.endpoint)
        self.relay.on_message = self._on_message
        self.relay.on_reply = self._on_reply
        self.attack: Attack | None = None
        self.harmless = True
        self.index = 0
        self.replies: list[bytes] = []
        self.check(Attack(LAYERS + 1, "replace", None, (), "", False, (), (), None))  # handshake
        self.hello = self.captured[0][0]

    def _on_message(self, message: list[bytes]) -> list[list[bytes]]:
        attack, live = self.attack, self.live
        self.capture(message)
        if attack is None or live is None or message[0][8:24] != live:
            return [message]
        self.index += 1
        if self.index - 1 != attack.victim:
            return [message]
        copy = alter(message, attack, self.captured, self.auth)
        self.harmless = attack.mode in ("before", "after") or (
            attack.mode == "replace" and copy == message
        )
        return arrange(message, copy, attack.mode)

    def _on_reply(self, reply: bytes) -> list[bytes]:
        replies, self.replies = self.replies, []
        return [*replies, reply]

    def check(self, attack: Attack) -> str:
        rid, transfer, blocks, pages, before = self.next_transfer()
        sender = self.ch.sender
        assert sender is not None
        self.ch.receiver.expect(transfer, rid, blocks, 60.0)
        self.harmless, self.index, self.replies = True, 0, list(attack.replies)
        self.attack, self.live = attack, transfer
        try:
            sender.open(TransferSpec(rid, transfer, self.relay.endpoint, tuple(blocks)))
            self.ch.push(transfer, pages)
            sender.finish(transfer, 7)
            for rogue in attack.rogues:
                self.rogue(rogue, transfer, blocks, pages)
            try:
                ok, message = self.ch.rec.wait_sent(rid)
            except AssertionError:
                raise Fatal("the sender never reported the transfer (its thread died?)") from None
            self.sync()
            verdict = self.judge(attack, rid, blocks, pages, before, self.harmless)
            expect(
                ok == (verdict == "completed"),
                f"the sender says {ok} ({message}), the receiver {verdict}",
            )
            expect(sender.pending() == 0, "the sender still holds the transfer")
            expect(self.relay.error is None, f"the relay's hook raised {self.relay.error!r}")
            return verdict
        finally:
            self.attack = self.live = None
            self.ch.receiver.cancel(transfer)

    def close(self) -> None:
        self.relay.close()
        super().close()


class StreamRig(AttackRig):
    """A receiver of the stream backend and a handshaken peer (a real stream link, the fleet's
    key) whose stream carries each transfer's records with one of them tampered with, or
    unreadable bytes that break the link (the peer then handshakes again and resends)."""

    def __init__(self, auth_name: str, scratch: Path) -> None:
        super().__init__(Transport("stream", Backend.STREAM, scratch), auth_name, sender=False)
        self.peer = self.ch.raw_peer()
        self.hello = self.handshake()

    def handshake(self) -> bytes:
        """RawPeer.handshake, keeping the HELLO (for the stranger to replay)."""
        peer = self.peer
        frame = peer.hello_frame()
        peer.sock.send(frame)
        reply = recv_header(peer.sock, self.auth, "WELCOME")
        expect(
            isinstance(reply, wire.HandshakeHeader) and reply.kind is wire.FrameKind.WELCOME,
            f"not welcomed: {reply}",
        )
        assert isinstance(reply, wire.HandshakeHeader)
        if peer.link is not None:
            peer.link.close()
        self.stream_address = reply.fields["rendezvous"]
        peer.link = join_pair(
            Backend.STREAM, self.stream_address, GROUP_TIMEOUT_S, self.auth.stream_proof
        )
        return frame

    def send(self, message: list[bytes]) -> None:
        assert isinstance(self.peer.link, StreamLink)
        payload = b"".join(message[1:])
        self.peer.link.send_record(message[0], memoryview(payload) if payload else None)

    def check(self, attack: Attack) -> str:
        rid, transfer, blocks, pages, before = self.next_transfer()
        self.ch.receiver.expect(transfer, rid, blocks, 60.0)
        self.live = transfer
        messages = [
            list(self.peer.page(transfer, pages[layer : layer + 1], blocks, layer))
            for layer in range(LAYERS)
        ]
        messages.append([wire.encode(wire.DoneHeader(transfer, 7, LAYERS), self.auth)])
        harmless = True
        try:
            if attack.break_stream is not None:
                for message in messages[: attack.victim]:
                    self.send(message)
                assert isinstance(self.peer.link, StreamLink)
                self.peer.link.sock.sendall(attack.break_stream)
                self.peer.link.close()  # the receiver reads to the end, breaks the link
                self.handshake()  # and a new one carries the whole transfer again
                for message in messages:
                    self.capture(message)  # what a stranger may replay (rogue "live")
                    self.send(message)
            else:
                for index, message in enumerate(messages):
                    self.capture(message)
                    if index != attack.victim:
                        self.send(message)
                        continue
                    copy = alter(message, attack, self.captured, self.auth)
                    harmless = attack.mode in ("before", "after") or (
                        attack.mode == "replace" and copy == message
                    )
                    for out in arrange(message, copy, attack.mode):
                        self.send(out)
            for rogue in attack.rogues:
                self.rogue(rogue, transfer, blocks, pages)
            recv_ack(self.peer.sock, self.auth, transfer)
            self.sync()
            self.peer.done(NOBODY)
            recv_ack(self.peer.sock, self.auth, NOBODY)
            return self.judge(attack, rid, blocks, pages, before, harmless)
        finally:
            self.live = None
            self.ch.receiver.cancel(transfer)
