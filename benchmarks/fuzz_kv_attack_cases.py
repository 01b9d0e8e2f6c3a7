"""What the attack targets throw at a receiver: a :class:`Relay` between a real sender and
receiver through which a rig tampers with messages and replies, and the inputs: an
:class:`Attack` (which message of a transfer is the victim and what is done to it, the
:class:`Rogue` messages strangers send meanwhile, hostile replies to the sender)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
from hypothesis import strategies as st

from benchmarks.fuzz_kv_common import (
    ANSWER_S,
    HOSTILE_SEALERS,
    NASTY_BODIES,
    PREFIX,
    SEALERS,
    VERIFIERS,
    Finding,
)
from benchmarks.fuzz_kv_frames import EDITS, HEADERS, Edit, apply_edits, reseal
from kvtransfer import wire
from tests.kvtransfer.harness import (
    LAYERS,
    bits,
)


class Relay:
    """A man in the middle on a ZeroMQ control channel: senders connect to its ROUTER, it talks
    to the receiver over one DEALER. Each sender message goes through ``on_message`` (the
    messages to forward instead: none, it, altered copies), each reply through ``on_reply``,
    back to the sender that last spoke. Without hooks it is a plain relay (which keeps the
    senders' connections up when the receiver behind it restarts)."""

    def __init__(self, upstream: str) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.front: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        self.back: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
        for sock in (self.front, self.back):
            sock.setsockopt(zmq.LINGER, 0)
        self.front.bind("tcp://127.0.0.1:0")
        self.back.connect(upstream)
        self.endpoint = self.front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.on_message: Callable[[list[bytes]], list[list[bytes]]] = lambda m: [m]
        self.on_reply: Callable[[bytes], list[bytes]] = lambda r: [r]
        self.error: BaseException | None = None  # a hook that raised (the message went as it was)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kv-relay", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        sender: bytes | None = None
        while not self._stop.is_set():
            for sock, _ in poller.poll(20):
                if sock is self.front:
                    sender, *message = self.front.recv_multipart()
                    for out in self._hook(self.on_message, message, [message]):
                        self.back.send_multipart(out)
                elif sender is not None:
                    reply = self.back.recv_multipart()[-1]
                    for out in self._hook(self.on_reply, reply, [reply]):
                        self.front.send_multipart([sender, out])
                else:
                    self.back.recv_multipart()
        self.front.close(linger=0)
        self.back.close(linger=0)

    def _hook(self, hook: Callable[[Any], list[Any]], item: Any, fallback: list[Any]) -> list[Any]:
        try:
            return [out for out in hook(item) if out]
        except Exception as exc:
            self.error = exc
            return fallback

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


MODES = (
    "replace",
    "before",
    "after",
    "drop",
)  # the victim: instead of / before / after its copy, or lost


@dataclass(frozen=True)
class Rogue:
    """A message a stranger sends while the transfer runs: ``what`` is ``garbage`` (``data``
    as it is), a PAGE / DONE / ABORT naming the live transfer sealed by a ``sealer`` that is
    not this fleet's, ``hello`` (the sender's HELLO, replayed), ``tcp`` (``data`` on a raw TCP
    connection to the receiver's port), ``stream`` (``data`` to its stream listener) or
    ``live`` (a message captured from the live transfer, replayed: ``--replay-live`` only)."""

    what: str
    sealer: str = "none"
    data: bytes = b""


@dataclass(frozen=True)
class Attack:
    victim: int  # which message of the transfer: a page per layer, then DONE
    mode: str
    replay: int | None  # the victim's copy starts as an earlier captured message (None: itself)
    edits: tuple[Edit, ...]
    reshape: str  # "" | "header only" | "extra frame" | "merged" (the copy's ZeroMQ frames)
    reseal: (
        bool  # the copy sealed again with the fleet's key: a buggy fleet member, not an attacker
    )
    rogues: tuple[Rogue, ...]
    replies: tuple[bytes, ...]  # hostile replies to the sender, before the transfer's own
    break_stream: bytes | None  # stream backend: written raw into the stream, which then closes


def nasty_reply(auth: wire.FrameAuth, body: bytes) -> bytes:
    """A WELCOME (to no HELLO) with ``body`` as its fields, sealed by ``auth``."""
    kind = wire.FrameKind.WELCOME
    prefix = PREFIX.pack(wire.MAGIC, wire.PROTOCOL_VERSION, kind, auth.flags, bytes(16))
    return reseal([prefix + body + bytes(wire.TAG_BYTES)], auth)[0]


def hostile_replies(auth_name: str) -> st.SearchStrategy[bytes]:
    """Replies no sender may act on: garbage, frames of other fleets, and (on an unkeyed channel,
    where anyone can seal) handshake answers to no HELLO with nasty bodies, acks of no transfer."""
    auth = VERIFIERS[auth_name]
    forged = st.builds(
        lambda name, h: wire.encode(h, SEALERS[name]), st.sampled_from(HOSTILE_SEALERS), HEADERS
    )
    options = [st.binary(max_size=64), forged]
    if auth.key is None:
        nasty = st.sampled_from(NASTY_BODIES).map(lambda body: nasty_reply(auth, body))
        nobody = st.just(
            wire.encode(
                wire.AckHeader(b"\xff" * 16, wire.AckStatus.FAILED, wire.HANDSHAKE_REQUIRED), auth
            )
        )
        options += [nasty, nobody]
    return st.one_of(options)


@st.composite
def attacks(
    draw: st.DrawFn, auth_name: str, stream: bool = False, replay_live: bool = False
) -> Attack:
    victim = draw(st.integers(0, LAYERS))
    modes = MODES if victim < LAYERS else ("before", "after")  # a lost DONE costs an ack timeout
    rogue_kinds = [
        "garbage",
        "forged",
        "hello",
        "tcp",
        *(["stream"] if stream else []),
        *(["live"] if replay_live else []),
    ]
    rogues = draw(
        st.lists(
            st.builds(
                Rogue,
                st.sampled_from(rogue_kinds),
                st.sampled_from(HOSTILE_SEALERS),
                st.binary(max_size=48),
            ),
            max_size=2,
        )
    )
    return Attack(
        victim=victim,
        mode=draw(st.sampled_from(modes)),
        replay=draw(st.none() | st.integers(0, 63)) if draw(st.integers(0, 3)) == 0 else None,
        edits=tuple(draw(st.lists(EDITS, max_size=2))),
        reshape=""
        if stream
        else draw(st.sampled_from(["", "", "", "header only", "extra frame", "merged"])),
        reseal=not VERIFIERS[auth_name].encrypt and draw(st.integers(0, 4)) == 0,
        rogues=tuple(rogues),
        replies=tuple(draw(st.lists(hostile_replies(auth_name), max_size=2))) if not stream else (),
        break_stream=draw(st.none() | st.binary(max_size=40))
        if stream and draw(st.integers(0, 5)) == 0
        else None,
    )


def recv_ack(sock: zmq.Socket[bytes], auth: wire.FrameAuth, transfer: bytes) -> wire.AckHeader:
    """The next ack of ``transfer`` on ``sock`` (other replies are skipped)."""
    deadline = time.monotonic() + 3 * ANSWER_S
    while time.monotonic() < deadline:
        if not sock.poll(100):
            continue
        try:
            reply = wire.decode(sock.recv(), auth)
        except wire.MalformedFrameError:
            continue
        if isinstance(reply, wire.AckHeader) and reply.transfer_id == transfer:
            return reply
    raise Finding(f"no ack of transfer {transfer.hex()}")


def page_message(
    transfer: bytes, pages: Any, blocks: list[int], auth: wire.FrameAuth, out_of_band: bool
) -> list[bytes]:
    """A PAGE as a correct sender builds it (``RawPeer.page``): its frame and payload as sent."""
    payload = bits(pages).numpy().tobytes()
    _, _, _, block_size, kv_heads, head_dim = pages.shape
    header = wire.PageHeader(
        transfer_id=transfer,
        layer_start=0,
        layer_end=pages.shape[0],
        block_ids=tuple(blocks),
        block_size=block_size,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=pages.dtype,
        payload_nbytes=len(payload),
        out_of_band=out_of_band,
    )
    frame, sent = wire.seal(header, auth, memoryview(payload))
    assert isinstance(sent, memoryview)
    return [frame, bytes(sent)]


def alter(
    message: list[bytes], attack: Attack, captured: list[list[bytes]], auth: wire.FrameAuth
) -> list[bytes]:
    """The victim's copy as the attack makes it."""
    base = message
    if attack.replay is not None and len(captured) > 1:
        base = captured[attack.replay % (len(captured) - 1)]  # an earlier one
    parts = apply_edits(list(base), attack.edits)
    if attack.reshape == "header only":
        parts = parts[:1]
    elif attack.reshape == "extra frame":
        parts = [*parts, bytes(8)]
    elif attack.reshape == "merged":
        parts = [b"".join(parts)]
    return reseal(parts, auth) if attack.reseal else parts


def arrange(message: list[bytes], copy: list[bytes], mode: str) -> list[list[bytes]]:
    return {"replace": [copy], "before": [copy, message], "after": [message, copy], "drop": []}[
        mode
    ]
