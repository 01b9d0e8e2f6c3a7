"""Shared pieces of the KV transfer contract suite.

- :class:`Transport`: one way of running the channel (ZeroMQ over tcp, ipc or inproc; the
  stream backend with tcp or ipc control; gloo).
- geometry helpers: fingerprints and KV caches that agree with them, random pages.
- :class:`Recorder`: every callback of a receiver and a sender, waitable.
- :class:`Channel`: a started :class:`KVReceiver` and :class:`KVSender` pair.
- :class:`RawPeer`: a hand-driven sender (its own DEALER socket, and pair group for gloo) for
  frames a correct sender never produces: forged, corrupted, truncated, late.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq

from core.ticket import Fingerprint
from engine.kv_cache import KVCache
from kvtransfer import wire
from kvtransfer.datapath import Backend, PairLink, StreamLink, join_pair
from kvtransfer.handshake import hello_fields
from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import KVSender, TransferSpec

LAYERS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, NUM_BLOCKS = 3, 4, 2, 8, 16
MODEL = "tiny-llama@sha256:0123abcd"
KEY = b"fleet-key-for-the-kv-contract-suite"
OTHER_KEY = b"not-the-fleet-key-but-long-enough"
TIMEOUT_S = 20.0  # generous: the suite shares two cores with other work
GROUP_TIMEOUT_S = 5.0  # pair rendezvous and payload waits; keeps a stuck pair from hanging
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
CRC = wire.FrameAuth(None)
NOBODY = b"\xff" * 16  # a transfer id no test uses
# One wrong value per fingerprint field (what a peer built differently would send).
MISMATCHES = [
    ("model", "tiny-llama@sha256:ffff"),
    ("dtype", "float16"),
    ("block_size", 8),
    ("num_layers", 4),
    ("num_kv_heads", 1),
    ("head_dim", 16),
    ("backend", "other"),  # replaced by the other CPU backend: see other_backend()
    ("layout", "L,NB,2,bs,KVH,D"),
    ("protocol_version", 1),
]


@dataclass(frozen=True)
class Transport:
    name: str  # tcp | ipc | inproc | stream | stream-ipc | gloo (control over tcp)
    backend: Backend
    scratch: Path  # where ipc sockets go

    def bind(self) -> str:
        """A fresh endpoint to bind a receiver (or a stand-in) to."""
        if self.name in ("ipc", "stream-ipc"):
            path = self.scratch / f"{uuid.uuid4().hex[:8]}.sock"
            assert len(str(path)) < 100, "ipc path too long for a unix socket"
            return f"ipc://{path}"
        if self.name == "inproc":  # both ends share zmq.Context.instance()
            return f"inproc://kv-{uuid.uuid4().hex}"
        return "tcp://127.0.0.1:0"


def fingerprint(
    backend: Backend, dtype: torch.dtype = torch.float32, **overrides: Any
) -> Fingerprint:
    fp = Fingerprint(
        model=MODEL,
        dtype=DTYPE_NAMES[dtype],
        block_size=BLOCK_SIZE,
        num_layers=LAYERS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        backend=backend.value,
    )
    return dataclasses.replace(fp, **overrides)


def other_backend(backend: Backend) -> Backend:
    return Backend.GLOO if backend is Backend.ZMQ else Backend.ZMQ


def mismatched(fp: Fingerprint, field: str, value: Any) -> Fingerprint:
    if field == "backend":
        value = other_backend(Backend(fp.backend)).value
    return dataclasses.replace(fp, **{field: value})


def xfail_on(request: pytest.FixtureRequest, names: tuple[str, ...], reason: str) -> None:
    """Mark the running test a strict expected failure on some transports only."""
    transport: Transport = request.getfixturevalue("transport")
    if transport.name in names:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


def cache_for(fp: Fingerprint, num_blocks: int = NUM_BLOCKS, seed: int | None = None) -> KVCache:
    """A CPU cache with ``fp``'s geometry: zeros, or random values when a seed is given."""
    dtype = getattr(torch, fp.dtype)
    cache = KVCache(
        fp.num_layers,
        num_blocks,
        fp.block_size,
        fp.num_kv_heads,
        fp.head_dim,
        dtype,
        torch.device("cpu"),
    )
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        cache.kv.copy_(torch.randn(cache.kv.shape, generator=generator))
    return cache


def random_pages(fp: Fingerprint, num_blocks: int, seed: int) -> torch.Tensor:
    """Pages ``(L, 2, n, bs, KVH, D)`` for ``fp``, the same in every process for a seed."""
    return cache_for(fp, num_blocks, seed).gather_pages(range(num_blocks))


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def tid(n: int) -> bytes:
    return n.to_bytes(16, "little")


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> None:
    """Poll a condition that has no event to wait on (e.g. a counter of another thread)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def drops(receiver: KVReceiver) -> int:
    return sum(receiver.stats.dropped_frames.values())


def stop_all(endpoints: Sequence[KVReceiver | KVSender]) -> None:
    """Stop everything at once. A sender's thread waits up to 0.1 s for its next command: a
    no-op command (an abort of a transfer it does not have) wakes it to notice the stop."""
    stoppers = [(e, threading.Thread(target=e.stop)) for e in endpoints]
    for _, stopper in stoppers:
        stopper.start()
    for endpoint, stopper in stoppers:
        while stopper.is_alive():
            if isinstance(endpoint, KVSender):
                endpoint.abort(NOBODY, "teardown")
            stopper.join(0.002)


class Recorder:
    """Every callback of a channel, by request id, in order; waitable."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.ready: dict[str, list[int]] = defaultdict(list)
        self.failed: dict[str, list[str]] = defaultdict(list)
        self.sent: dict[str, list[tuple[bool, str]]] = defaultdict(list)

    def on_ready(self, request_id: str, first_token_id: int) -> None:
        with self.cond:
            self.ready[request_id].append(first_token_id)
            self.cond.notify_all()

    def on_failed(self, request_id: str, reason: str) -> None:
        with self.cond:
            self.failed[request_id].append(reason)
            self.cond.notify_all()

    def on_sent(self, request_id: str, ok: bool, message: str) -> None:
        with self.cond:
            self.sent[request_id].append((ok, message))
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), f"timed out waiting for {what}"

    def wait_sent(self, request_id: str) -> tuple[bool, str]:
        self.wait(lambda: request_id in self.sent, f"on_sent({request_id})")
        return self.sent[request_id][0]

    def wait_ready(self, request_id: str) -> int:
        self.wait(lambda: request_id in self.ready, f"on_ready({request_id})")
        return self.ready[request_id][0]

    def wait_failed(self, request_id: str) -> str:
        self.wait(lambda: request_id in self.failed, f"on_failed({request_id})")
        return self.failed[request_id][0]


class Channel:
    """A started receiver over ``dst`` and a started sender, sharing one :class:`Recorder`."""

    def __init__(
        self,
        transport: Transport,
        *,
        dtype: torch.dtype = torch.float32,
        receiver_fp: Fingerprint | None = None,
        sender_fp: Fingerprint | None = None,
        receiver_auth: wire.FrameAuth = CRC,
        sender_auth: wire.FrameAuth | None = None,
        dst: KVCache | None = None,
        sender: bool = True,
        recorder: Recorder | None = None,
        group_timeout_s: float = GROUP_TIMEOUT_S,
        stream_port: int = 0,
        **sender_kwargs: Any,
    ) -> None:
        self.transport = transport
        self.rec = recorder or Recorder()
        self.receiver_fp = receiver_fp or fingerprint(transport.backend, dtype)
        self.sender_fp = sender_fp or self.receiver_fp
        self.receiver_auth = receiver_auth
        self.sender_auth = sender_auth or receiver_auth
        self.dst = dst if dst is not None else cache_for(self.receiver_fp, seed=99)
        self.receiver = KVReceiver(
            transport.bind(),
            self.dst,
            self.receiver_fp,
            receiver_auth,
            self.rec.on_ready,
            self.rec.on_failed,
            stream_port=stream_port,
            group_timeout_s=group_timeout_s,
        )
        self.endpoint = self.receiver.start()
        self.sender: KVSender | None = None
        self.peers: list[RawPeer] = []
        if sender:
            self.start_sender(**sender_kwargs)

    def start_sender(self, **kwargs: Any) -> KVSender:
        kwargs.setdefault("ack_timeout_s", TIMEOUT_S)
        kwargs.setdefault("handshake_timeout_s", GROUP_TIMEOUT_S)
        self.sender = KVSender(self.sender_fp, self.sender_auth, on_sent=self.rec.on_sent, **kwargs)
        self.sender.start()
        return self.sender

    def send(
        self,
        request_id: str,
        transfer_id: bytes,
        dst_blocks: Sequence[int],
        pages: torch.Tensor,
        *,
        layerwise: bool = True,
        first_token_id: int | None = 7,
        layers: range | None = None,
    ) -> None:
        """Open a transfer and push ``pages`` (all layers); finish unless no token is given."""
        assert self.sender is not None
        self.sender.open(TransferSpec(request_id, transfer_id, self.endpoint, tuple(dst_blocks)))
        self.push(transfer_id, pages, layerwise=layerwise, layers=layers)
        if first_token_id is not None:
            self.sender.finish(transfer_id, first_token_id)

    def push(
        self,
        transfer_id: bytes,
        pages: torch.Tensor,
        *,
        layerwise: bool = True,
        layers: range | None = None,
    ) -> None:
        assert self.sender is not None
        layers = layers if layers is not None else range(pages.shape[0])
        if not layers:
            return
        if not layerwise:
            self.sender.send_pages(transfer_id, layers.start, pages[layers.start : layers.stop])
            return
        for layer in layers:
            self.sender.send_pages(transfer_id, layer, pages[layer : layer + 1])

    def raw_peer(
        self, auth: wire.FrameAuth | None = None, fp: Fingerprint | None = None
    ) -> RawPeer:
        peer = RawPeer(self.endpoint, fp or self.receiver_fp, auth or self.receiver_auth)
        self.peers.append(peer)
        return peer

    def close(self) -> None:
        """Stop both ends at once: each takes up to one idle poll interval to notice."""
        stop_all([self.receiver, *([self.sender] if self.sender is not None else [])])
        for peer in self.peers:
            peer.close()


class RawPeer:
    """A sender driven by hand. After :meth:`handshake` the receiver accepts its frames; its
    PAGEs go in band, or (out-of-band backends) as a header here and the payload over its
    pair link."""

    def __init__(self, endpoint: str, fp: Fingerprint, auth: wire.FrameAuth) -> None:
        self.fp = fp
        self.auth = auth
        self.backend = Backend(fp.backend)
        self.link: PairLink | None = None
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, int(TIMEOUT_S * 1000))
        self.sock.connect(endpoint)

    def hello_frame(self, auth: wire.FrameAuth | None = None) -> bytes:
        hello = wire.HandshakeHeader(os.urandom(16), wire.FrameKind.HELLO, hello_fields(self.fp))
        return wire.encode(hello, auth or self.auth)

    def handshake(self) -> wire.HandshakeHeader:
        self.sock.send(self.hello_frame())
        reply = self.recv()
        assert isinstance(reply, wire.HandshakeHeader), reply
        assert reply.kind is wire.FrameKind.WELCOME, reply
        if self.backend.out_of_band:
            self.link = join_pair(
                self.backend, reply.fields["rendezvous"], GROUP_TIMEOUT_S, self.auth.stream_proof
            )
        return reply

    def page(
        self,
        transfer_id: bytes,
        pages: torch.Tensor,
        block_ids: Sequence[int],
        layer_start: int = 0,
        auth: wire.FrameAuth | None = None,
    ) -> tuple[bytes, bytes]:
        """``(header, payload)`` of a PAGE as a correct sender of this backend builds it (the
        payload encrypted, on an encrypting channel)."""
        payload = bits(pages).numpy().tobytes()
        header = wire.PageHeader(
            transfer_id=transfer_id,
            layer_start=layer_start,
            layer_end=layer_start + pages.shape[0],
            block_ids=tuple(block_ids),
            block_size=pages.shape[3],
            num_kv_heads=pages.shape[4],
            head_dim=pages.shape[5],
            dtype=pages.dtype,
            payload_nbytes=len(payload),
            out_of_band=self.backend.out_of_band,
        )
        frame, sent = wire.seal(header, auth or self.auth, memoryview(payload))
        assert isinstance(sent, memoryview)
        return frame, bytes(sent)  # the ciphertext on an encrypting channel

    def send_page(self, header: bytes, payload: bytes) -> None:
        """Send a (possibly tampered) PAGE the way the receiver will read it: the payload goes
        over the pair link exactly when the receiver will parse the header as an out-of-band
        PAGE from a handshaken peer, and so post a receive for it; otherwise it goes in band."""
        if isinstance(self.link, StreamLink):  # records say their sizes: anything goes
            self.link.send_record(header, memoryview(payload))
            return
        size = wire.out_of_band_payload_size(header)
        if size is not None and self.link is not None:
            # the receiver takes a payload of the size the header declares, even off a header it
            # refuses (so the pair stream stays in step)
            assert len(payload) == size, "out-of-band payloads have the header's size"
            self.sock.send(header)
            self.link.send(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        else:
            self.sock.send_multipart([header, payload])

    def send_pages(
        self,
        transfer_id: bytes,
        pages: torch.Tensor,
        block_ids: Sequence[int],
        auth: wire.FrameAuth | None = None,
    ) -> None:
        """Every layer of ``pages``, one PAGE per layer."""
        for layer in range(pages.shape[0]):
            self.send_page(
                *self.page(transfer_id, pages[layer : layer + 1], block_ids, layer, auth)
            )

    def send(self, header: wire.Header, auth: wire.FrameAuth | None = None) -> None:
        """A control frame where a correct sender puts it: with the stream backend on the
        pair's stream (in order with the pages), else on the ZeroMQ socket."""
        frame = wire.encode(header, auth or self.auth)
        if isinstance(self.link, StreamLink):
            self.link.send_record(frame)
        else:
            self.sock.send(frame)

    def done(self, transfer_id: bytes, first_token_id: int = 7, num_layers: int = LAYERS) -> None:
        self.send(wire.DoneHeader(transfer_id, first_token_id, num_layers))

    def recv(self) -> wire.Header:
        return wire.decode(self.sock.recv(), self.auth)

    def recv_ack(self) -> wire.AckHeader:
        header = self.recv()
        assert isinstance(header, wire.AckHeader), header
        return header

    def sync(self) -> None:
        """Return once the receiver has handled every frame sent before: a DONE for a transfer
        nobody expects is answered (and counted as an ``unknown_transfer`` drop)."""
        self.done(NOBODY)
        ack = self.recv_ack()
        assert ack.transfer_id == NOBODY and ack.status is wire.AckStatus.FAILED

    def close(self) -> None:
        self.sock.close(linger=0)
        if self.link is not None:
            self.link.close()
