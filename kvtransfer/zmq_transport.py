"""KV pages over ZeroMQ: the decode side binds a ROUTER, prefill sides connect DEALERs.

Transfer state machines, each owned by one thread that polls it:

    sender:    queued -> sending -> awaiting ack -> done | failed (nack, timeout, send error)
    receiver:  expected (lease running) -> receiving pages -> ready | failed (bad frame,
               abort, lease expired, cancelled)

Payload frames go out with ``copy=False`` and arrive as ZeroMQ frames that are viewed, not
copied, until the single copy into the destination blocks. A receiver writes only into blocks
of a transfer it currently expects: :meth:`KVReceiver.cancel` removes the expectation under the
same lock the writer holds, so after it returns no frame can touch those blocks again, and late
or duplicate frames for a finished transfer are dropped.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import torch
import zmq

from engine.kv_cache import KVCache
from kvtransfer import wire

log = structlog.get_logger(__name__)

ReadyCallback = Callable[[str, int], None]  # (request_id, first_token_id)
FailedCallback = Callable[[str, str], None]  # (request_id, reason)
SentCallback = Callable[[str, bool, str], None]  # (request_id, ok, message)

_POLL_MS = 50
_SEND_TIMEOUT_MS = 5000


@dataclass
class _Expected:
    request_id: str
    block_ids: frozenset[int]
    deadline: float
    written: dict[int, set[int]] = field(default_factory=dict)  # layer -> blocks written

    def complete(self, num_layers: int) -> bool:
        """Every reserved block has been written for every layer."""
        return all(self.written.get(layer, set()) >= self.block_ids for layer in range(num_layers))


@dataclass
class ReceiverCounters:
    pages: int = 0
    bytes: int = 0
    completed: int = 0
    failed: int = 0
    dropped_frames: int = 0


class KVReceiver:
    """Decode side: accepts pages for reserved blocks and writes them into the KV cache."""

    def __init__(
        self,
        bind_endpoint: str,
        kv_cache: KVCache,
        on_ready: ReadyCallback,
        on_failed: FailedCallback,
        *,
        verify_checksum: bool = True,
    ) -> None:
        self._bind_endpoint = bind_endpoint
        self._kv = kv_cache
        self._on_ready = on_ready
        self._on_failed = on_failed
        self._verify = verify_checksum
        self._expected: dict[bytes, _Expected] = {}
        self._lock = threading.Lock()
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock: zmq.Socket[bytes] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.endpoint = bind_endpoint
        self.counters = ReceiverCounters()

    def start(self) -> str:
        """Bind and start the receiving thread; returns the bound endpoint (port resolved)."""
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.bind(self._bind_endpoint)
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock = sock
        self._thread = threading.Thread(target=self._loop, name="kv-receiver", daemon=True)
        self._thread.start()
        log.info("kv_receiver_listening", endpoint=self.endpoint)
        return self.endpoint

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def expect(
        self, transfer_id: bytes, request_id: str, block_ids: list[int], lease_s: float
    ) -> None:
        """Accept pages for ``transfer_id`` into ``block_ids`` until the lease runs out."""
        with self._lock:
            self._expected[transfer_id] = _Expected(
                request_id, frozenset(block_ids), time.monotonic() + lease_s
            )

    def cancel(self, transfer_id: bytes) -> bool:
        """Stop accepting pages for a transfer. After this returns no frame writes its blocks."""
        with self._lock:
            return self._expected.pop(transfer_id, None) is not None

    def pending(self) -> int:
        with self._lock:
            return len(self._expected)

    # -- receiving thread -------------------------------------------------------------------

    def _loop(self) -> None:
        assert self._sock is not None
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if poller.poll(_POLL_MS):
                for _ in range(256):  # drain a burst, then check leases
                    try:
                        frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(frames[0].bytes, frames[1:])
            self._expire_leases()
        self._sock.close(linger=0)

    def _handle(self, peer: bytes, frames: list[zmq.Frame]) -> None:
        try:
            header = wire.decode(frames[0].buffer)
        except (wire.MalformedFrameError, IndexError) as exc:
            self.counters.dropped_frames += 1
            log.warning("kv_frame_dropped", reason=str(exc))
            return
        tid = header.transfer_id
        with self._lock:
            expected = self._expected.get(tid)
            outcome = None if expected is None else self._apply(tid, expected, header, frames)
        if expected is None:
            self.counters.dropped_frames += 1  # late, duplicate or unknown transfer
            if isinstance(header, wire.DoneHeader):  # tell the sender now, not at its timeout
                self._ack(peer, tid, wire.AckStatus.FAILED, "unknown, finished or expired transfer")
            return
        if outcome is None:
            return
        request_id, ok, message = outcome
        if ok:
            self.counters.completed += 1
            self._ack(peer, tid, wire.AckStatus.OK, "")
            self._on_ready(request_id, int(message))
        else:
            self.counters.failed += 1
            log.warning("kv_transfer_failed", request_id=request_id, reason=message)
            self._ack(peer, tid, wire.AckStatus.FAILED, message)
            self._on_failed(request_id, f"KV transfer failed: {message}")

    def _apply(
        self, tid: bytes, expected: _Expected, header: wire.Header, frames: list[zmq.Frame]
    ) -> tuple[str, bool, str] | None:
        """Apply one frame of an expected transfer (lock held); returns its outcome when it
        ends the transfer: ``(request_id, ok, first token id or failure reason)``."""
        try:
            if isinstance(header, wire.PageHeader):
                if len(frames) != 2:
                    raise wire.MalformedFrameError(f"PAGE with {len(frames) - 1} payloads")
                self._write_page(expected, header, frames[1].buffer)
                return None
            if isinstance(header, wire.DoneHeader):
                if header.num_layers != self._kv.num_layers:
                    raise wire.MalformedFrameError(
                        f"DONE for {header.num_layers} layers, receiver has {self._kv.num_layers}"
                    )
                if not expected.complete(self._kv.num_layers):
                    raise wire.MalformedFrameError(
                        "DONE with layers missing: a reserved block has not arrived"
                    )
                del self._expected[tid]
                return (expected.request_id, True, str(header.first_token_id))
            if isinstance(header, wire.AbortHeader):
                raise wire.MalformedFrameError(f"sender aborted: {header.reason}")
            raise wire.MalformedFrameError("unexpected ACK on the receiving side")
        except wire.MalformedFrameError as exc:
            del self._expected[tid]
            return (expected.request_id, False, str(exc))

    def _write_page(
        self, expected: _Expected, header: wire.PageHeader, payload: memoryview
    ) -> None:
        kv = self._kv
        geometry = (header.block_size, header.num_kv_heads, header.head_dim, header.dtype)
        mine = (kv.block_size, kv.num_kv_heads, kv.head_dim, kv.dtype)
        if geometry != mine:
            raise wire.MalformedFrameError(f"page geometry {geometry} != receiver's {mine}")
        if header.layer_end > kv.num_layers:
            raise wire.MalformedFrameError(f"layer {header.layer_end - 1} >= {kv.num_layers}")
        if not expected.block_ids.issuperset(header.block_ids):
            raise wire.MalformedFrameError("page targets blocks outside the reservation")
        wire.verify_payload(header, payload, verify_checksum=self._verify)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we only read it
            flat = torch.frombuffer(payload, dtype=torch.uint8)
        pages = flat.view(header.dtype).view(header.shape)
        kv.scatter_pages(header.block_ids, pages, slice(header.layer_start, header.layer_end))
        for layer in range(header.layer_start, header.layer_end):
            expected.written.setdefault(layer, set()).update(header.block_ids)
        self.counters.pages += 1
        self.counters.bytes += header.payload_nbytes

    def _ack(self, peer: bytes, tid: bytes, status: wire.AckStatus, message: str) -> None:
        assert self._sock is not None
        frame = wire.encode(wire.AckHeader(tid, status, message))
        try:
            self._sock.send_multipart([peer, frame], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("kv_ack_failed", reason=str(exc))

    def _expire_leases(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [(tid, e) for tid, e in self._expected.items() if e.deadline <= now]
            for tid, _ in expired:
                del self._expected[tid]
        for _, e in expired:
            self.counters.failed += 1
            log.warning("kv_lease_expired", request_id=e.request_id)
            self._on_failed(e.request_id, "KV transfer lease expired before all pages arrived")


@dataclass(frozen=True)
class OutgoingTransfer:
    """Pages to push: ``pages`` is (L, 2, n, bs, KVH, D), ``block_ids`` the receiver's blocks."""

    request_id: str
    transfer_id: bytes
    endpoint: str
    block_ids: tuple[int, ...]
    pages: torch.Tensor
    first_token_id: int


@dataclass
class SenderCounters:
    transfers: int = 0
    bytes: int = 0
    acked: int = 0
    failed: int = 0


class KVSender:
    """Prefill side: pushes pages layer by layer and holds them until acknowledged."""

    def __init__(
        self,
        *,
        checksum: bool = True,
        ack_timeout_s: float = 30.0,
        on_sent: SentCallback | None = None,
    ) -> None:
        self._checksum = checksum
        self._ack_timeout = ack_timeout_s
        self._on_sent = on_sent
        self._queue: queue.Queue[OutgoingTransfer] = queue.Queue()
        self._awaiting: dict[bytes, tuple[OutgoingTransfer, float]] = {}
        self._sockets: dict[str, zmq.Socket[bytes]] = {}
        self._poller = zmq.Poller()
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.counters = SenderCounters()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kv-sender", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def submit(self, transfer: OutgoingTransfer) -> None:
        """Queue a transfer (any thread). The sender owns ``pages`` from now on."""
        self._queue.put(transfer)

    def pending(self) -> int:
        return self._queue.qsize() + len(self._awaiting)

    # -- sending thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._queue.get(timeout=0.002 if self._awaiting else 0.1)
            except queue.Empty:
                job = None
            if job is not None:
                self._send(job)
            if self._awaiting:
                self._collect_acks()
                self._expire()
        for sock in self._sockets.values():
            sock.close(linger=0)

    def _socket(self, endpoint: str) -> zmq.Socket[bytes]:
        sock = self._sockets.get(endpoint)
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDTIMEO, _SEND_TIMEOUT_MS)
            sock.connect(endpoint)
            self._sockets[endpoint] = sock
            self._poller.register(sock, zmq.POLLIN)
        return sock

    def _send(self, job: OutgoingTransfer) -> None:
        pages = job.pages.cpu() if job.pages.device.type != "cpu" else job.pages  # host staging
        sock = self._socket(job.endpoint)
        num_layers, _, _, block_size, kv_heads, head_dim = pages.shape
        try:
            for layer in range(num_layers):
                raw = pages[layer].contiguous().view(torch.uint8).numpy()
                payload = memoryview(raw).cast("B")  # type: ignore[arg-type]
                header = wire.PageHeader(
                    transfer_id=job.transfer_id,
                    layer_start=layer,
                    layer_end=layer + 1,
                    block_ids=job.block_ids,
                    block_size=block_size,
                    num_kv_heads=kv_heads,
                    head_dim=head_dim,
                    dtype=pages.dtype,
                    payload_nbytes=payload.nbytes,
                    crc32=wire.checksum(payload) if self._checksum else None,
                )
                sock.send_multipart([wire.encode(header), payload], copy=False)
                self.counters.bytes += payload.nbytes
            done = wire.DoneHeader(job.transfer_id, job.first_token_id, num_layers)
            sock.send(wire.encode(done))
        except zmq.ZMQError as exc:
            self._finish(job, False, f"send to {job.endpoint} failed: {exc}")
            return
        self.counters.transfers += 1
        self._awaiting[job.transfer_id] = (job, time.monotonic() + self._ack_timeout)

    def _collect_acks(self) -> None:
        for sock, _ in self._poller.poll(0):
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    header = wire.decode(frame)
                except wire.MalformedFrameError as exc:
                    log.warning("kv_ack_dropped", reason=str(exc))
                    continue
                if not isinstance(header, wire.AckHeader):
                    continue
                entry = self._awaiting.pop(header.transfer_id, None)
                if entry is None:
                    continue
                ok = header.status is wire.AckStatus.OK
                self._finish(entry[0], ok, header.message)

    def _expire(self) -> None:
        now = time.monotonic()
        for tid, (job, deadline) in list(self._awaiting.items()):
            if deadline <= now:
                del self._awaiting[tid]
                self._finish(job, False, f"no acknowledgement within {self._ack_timeout:.0f}s")

    def _finish(self, job: OutgoingTransfer, ok: bool, message: str) -> None:
        if ok:
            self.counters.acked += 1
        else:
            self.counters.failed += 1
            log.warning("kv_send_failed", request_id=job.request_id, reason=message)
        if self._on_sent is not None:
            self._on_sent(job.request_id, ok, message)
