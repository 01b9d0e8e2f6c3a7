"""The stream backend's payload channel: sized records on a plain stream socket per pair.

After the handshake (on ZeroMQ), a transfer's frames (PAGE with its payload, DONE, ABORT) go as
records on a tcp socket to the decode worker's page listener (or a unix socket beside an ipc
control endpoint), and the receiver reads each payload straight into the reserved blocks of
the KV pool. A record is ``header_len u32 | 0 u32 | payload_len u64 | header frame | payload``:
self-delimiting, so a refused frame is skipped without losing step. The decode side's
:class:`StreamHost` listens and hands each connection to the peer whose one-time token (sent in
the MACed WELCOME) it presents (:meth:`StreamHost.claim`: a future its accepting thread
fulfils, so no thread waits for a peer that never joins); :func:`join_stream` is the sender's
end.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import select
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from kvtransfer.pair_link import PairHost, PairLink, PairLinkError, tensor_bytes

TOKEN_BYTES = 16
Prove = Callable[[bytes], bytes]
"""What a joiner sends for an offer's token: on a keyed channel a MAC of it under the fleet's
key (``FrameAuth.stream_proof``), so a token seen on the wire is of no use without the key."""
RECORD = struct.Struct("<IIQ")  # header bytes, reserved (0), payload bytes
MAX_RECORD_HEADER_BYTES = 1 << 24  # far above any PAGE header (4 bytes per block id)
MAX_RECORD_PAYLOAD_BYTES = 1 << 36
STREAM_BUFFER_BYTES = 4 << 20  # unix socket buffers (capped by net.core.[rw]mem_max)
STREAM_STALL_S = 5.0  # receiving side: a record that makes no progress this long breaks the link
_RECV_SLICE_S = 0.2  # a direct read wakes this often (so a cancel never waits longer)
_PROOF_TIMEOUT_S = 2.0  # a connection that has not proved a token by then is closed
_MAX_UNPROVEN = 64  # connections still to prove one, at most (the oldest goes first)
_ACCEPT_POLL_S = 0.5  # the accepting thread notices close() and proof timeouts this often


class StreamLink(PairLink):
    """A connected stream socket in blocking mode with kernel timeouts: a read waits for its
    whole buffer (``MSG_WAITALL``: one system call per region of pool memory) but returns
    after ``_RECV_SLICE_S`` with what it has, so the receiver can notice a cancel between
    reads; a read that makes no progress for ``timeout_s`` fails, and so does a send."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self.sock = sock
        self.timeout_s = timeout_s
        self._scratch = bytearray(1 << 20)
        sock.settimeout(None)  # blocking: Python's own timeouts poll before every call
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(_RECV_SLICE_S))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout_s))

    def send(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()  # host staging
        try:
            self.sock.sendall(tensor_bytes(tensor))
        except OSError as exc:  # incl. timeouts: a receiver that stopped reading
            raise PairLinkError(f"payload stream: {exc}") from exc

    def send_record(self, header: bytes, payload: memoryview | None = None) -> None:
        """One record (a frame and its payload) in one ``sendmsg`` where the kernel takes it."""
        size = 0 if payload is None else payload.nbytes
        parts = [memoryview(RECORD.pack(len(header), 0, size) + header)]
        if payload is not None and size:
            parts.append(payload.cast("B") if payload.format != "B" else payload)
        try:
            while parts:
                sent = self.sock.sendmsg(parts)
                while sent:
                    if sent >= len(parts[0]):
                        sent -= len(parts.pop(0))
                    else:
                        parts[0], sent = parts[0][sent:], 0
        except OSError as exc:  # incl. timeouts: a receiver that stopped reading
            raise PairLinkError(f"payload stream: {exc}") from exc

    def read_record(self) -> tuple[bytes, int]:
        """The next record's header frame and its payload size (the payload is still to be
        read). :class:`PairLinkError` if the stream breaks or the record is unreadable."""
        prefix = bytearray(RECORD.size)
        self.read_into(memoryview(prefix))
        header_len, reserved, payload_len = RECORD.unpack(prefix)
        if (
            reserved
            or header_len > MAX_RECORD_HEADER_BYTES
            or payload_len > MAX_RECORD_PAYLOAD_BYTES
        ):
            raise PairLinkError("payload stream: unreadable record (lost step with the sender)")
        header = bytearray(header_len)
        self.read_into(memoryview(header))
        return bytes(header), payload_len

    def readable(self) -> bool:
        """Whether a read would find data now (or the end of the stream)."""
        ready, _, _ = select.select([self.sock], [], [], 0)
        return bool(ready)

    def read_bytes(self, nbytes: int) -> memoryview:
        buffer = bytearray(nbytes)
        self.read_into(memoryview(buffer))
        return memoryview(buffer)

    def receive(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=dtype)
        self.read_into(tensor_bytes(buffer))
        return buffer.to(device)

    def read_some(self, view: memoryview) -> int:
        """Read what is there into ``view`` (at most one wake-up slice); 0 when nothing came."""
        try:
            count = self.sock.recv_into(view, 0, socket.MSG_WAITALL)
        except (BlockingIOError, TimeoutError):  # the slice ran out with nothing read
            return 0
        except OSError as exc:
            raise PairLinkError(f"payload stream: {exc}") from exc
        if count == 0:
            raise PairLinkError("payload stream: closed by the peer")
        return count

    def read_into(self, view: memoryview) -> None:
        """Fill ``view`` completely; :class:`PairLinkError` if the stream breaks or stalls."""
        filled, last = 0, time.monotonic()
        while filled < len(view):
            count = self.read_some(view[filled:])
            filled += count
            now = time.monotonic()
            if count:
                last = now
            elif now - last > self.timeout_s:
                raise PairLinkError(f"payload stream: no data for {self.timeout_s:.0f}s")

    def discard(self, nbytes: int) -> None:
        scratch = memoryview(self._scratch)
        while nbytes > 0:
            chunk = scratch[: min(nbytes, len(scratch))]
            self.read_into(chunk)
            nbytes -= len(chunk)

    def close(self) -> None:
        self.sock.close()


class StreamHost(PairHost):
    """A listening socket. Each offer carries a fresh random token; a connection is given to
    the peer that presents the token's proof first (``prove(token)``: on a keyed channel a MAC
    of it, so an eavesdropper who read the WELCOME cannot claim the link), and closed if it
    presents none in time, or once the offer is withdrawn. Each payload is authenticated with
    its header as well."""

    def __init__(
        self,
        host: str,
        timeout_s: float,
        unix_path: str | None,
        port: int = 0,
        prove: Prove = bytes,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"stream port {port} is not a TCP port (0-65535; 0: ephemeral)")
        self.host = host
        self.port = port
        self._prove = prove
        self.timeout_s = timeout_s
        self.unix_path = unix_path
        self._listener: socket.socket | None = None
        self._address: dict[str, object] = {}
        self._waiting: dict[bytes, Future[StreamLink]] = {}  # by proof, until claimed and done
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if port and unix_path is None:
            self._listen()  # a fixed port that is taken fails the worker's start, not a peer

    def offer(self) -> dict[str, object]:
        with self._lock:
            if self._listener is None:
                self._listen()
            token = os.urandom(TOKEN_BYTES)
            self._waiting[self._prove(token)] = Future()
        return {**self._address, "token": token.hex()}

    def claim(self, offer: dict[str, object]) -> Future[StreamLink]:
        """The link of the peer given ``offer``, once it joins: a future that the accepting
        thread fulfils (nobody waits for it). Cancelling it withdraws the offer: a join after
        that is closed. The offer is forgotten once the future is done."""
        proof = self._prove(bytes.fromhex(str(offer["token"])))
        with self._lock:
            future = self._waiting[proof]
        future.add_done_callback(lambda _: self._forget(proof))
        return future

    def accept(self, offer: dict[str, object]) -> PairLink:
        future = self.claim(offer)
        try:
            return future.result(timeout=self.timeout_s)
        except TimeoutError:
            if not future.cancel():  # joined at the last moment
                return future.result()
            raise PairLinkError("payload stream: the peer never connected") from None

    def _forget(self, proof: bytes) -> None:
        with self._lock:
            self._waiting.pop(proof, None)

    def close(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            waiting = list(self._waiting.values())
        for future in waiting:
            future.cancel()
        if listener is not None:
            listener.close()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)

    def _listen(self) -> None:
        if self.unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(self.unix_path)
            self._address = {"stream_path": self.unix_path}
        else:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
            self._address = {"stream_host": self.host, "stream_port": listener.getsockname()[1]}
        listener.listen(64)
        listener.setblocking(False)  # the accepting thread selects on it
        self._listener = listener
        self._thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name="kv-stream-accept", daemon=True
        )
        self._thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        """Accept connections and read each one's proof side by side, so one that says
        nothing (a port scan, a health probe) or too little holds up no other: a connection
        whose proof is a waiting offer's goes to it; one that has not proved anything within
        ``_PROOF_TIMEOUT_S`` is closed, and so is the oldest past ``_MAX_UNPROVEN``."""
        selector = selectors.DefaultSelector()
        try:
            selector.register(listener, selectors.EVENT_READ)
        except (OSError, ValueError):  # closed before this thread began
            selector.close()
            return
        unproven: dict[socket.socket, tuple[bytearray, float]] = {}  # oldest first
        try:
            while self._listener is listener:
                try:
                    ready = selector.select(timeout=_ACCEPT_POLL_S)
                except (OSError, ValueError):
                    return  # closed
                for key, _ in ready:
                    if key.fileobj is listener:
                        if not self._take(listener, selector, unproven):
                            return
                        continue
                    conn = key.fileobj
                    assert isinstance(conn, socket.socket)
                    proof = _read_proof(conn, unproven[conn][0])
                    if proof is not None:
                        selector.unregister(conn)
                        del unproven[conn]
                        self._hand_over(conn, proof)
                now = time.monotonic()
                for conn, (_, deadline) in list(unproven.items()):
                    if deadline <= now:
                        _drop(conn, selector, unproven)
        finally:
            for conn in list(unproven):
                _drop(conn, selector, unproven)
            selector.close()

    def _take(
        self,
        listener: socket.socket,
        selector: selectors.BaseSelector,
        unproven: dict[socket.socket, tuple[bytearray, float]],
    ) -> bool:
        """Accept one connection (its proof is read as it comes); False once closed."""
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, TimeoutError):
            return True
        except OSError:
            return False  # closed
        if len(unproven) >= _MAX_UNPROVEN:
            _drop(next(iter(unproven)), selector, unproven)
        conn.setblocking(False)
        unproven[conn] = (bytearray(), time.monotonic() + _PROOF_TIMEOUT_S)
        selector.register(conn, selectors.EVENT_READ)
        return True

    def _hand_over(self, conn: socket.socket, proof: bytes) -> None:
        """Give a connection to the offer whose proof it presented (else close it)."""
        with self._lock:
            future = next(
                (f for p, f in self._waiting.items() if hmac.compare_digest(p, proof)), None
            )
        # unknown, used or withdrawn token, or no key behind it
        if not proof or future is None or future.done():
            conn.close()
            return
        if not future.set_running_or_notify_cancel():
            conn.close()
            return
        _tune(conn)
        # a healthy sender never pauses inside a record (one sendmsg each): a stall this
        # long means a hung peer, and the receiving thread must get back to the other peers
        future.set_result(StreamLink(conn, min(self.timeout_s, STREAM_STALL_S)))


def join_stream(offer: dict[str, object], timeout_s: float, prove: Prove = bytes) -> StreamLink:
    """Sender side: connect to the offered listener and claim the link with the token's
    proof."""
    token = bytes.fromhex(str(offer["token"]))
    if len(token) != TOKEN_BYTES:
        raise ValueError("stream offer carries a malformed token")
    if "stream_path" in offer:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: Any = str(offer["stream_path"])
    else:
        host = str(offer["stream_host"])
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        address = (host, int(str(offer["stream_port"])))
    sock.settimeout(timeout_s)
    try:
        sock.connect(address)
        _tune(sock)
        sock.sendall(prove(token))
    except OSError as exc:
        sock.close()
        raise PairLinkError(f"payload stream: cannot connect: {exc}") from exc
    return StreamLink(sock, timeout_s)


def _tune(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):  # TCP autotunes its buffers
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:  # a unix socket keeps the default (~200 KB) unless told
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STREAM_BUFFER_BYTES)


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


def _read_proof(conn: socket.socket, got: bytearray) -> bytes | None:
    """Read what a connection has sent of its proof into ``got``: the whole proof, once it
    has come; empty bytes if the connection ended first (or failed); None while it comes."""
    try:
        chunk = conn.recv(TOKEN_BYTES - len(got))
    except BlockingIOError:
        return None
    except OSError:
        return b""
    if not chunk:
        return b""
    got += chunk
    return bytes(got) if len(got) == TOKEN_BYTES else None


def _drop(
    conn: socket.socket,
    selector: selectors.BaseSelector,
    unproven: dict[socket.socket, tuple[bytearray, float]],
) -> None:
    with contextlib.suppress(KeyError, ValueError):
        selector.unregister(conn)
    unproven.pop(conn, None)
    conn.close()
