"""The chaos tests' fault-injecting TCP proxy (tests/support/fault_proxy.py) in front of a real
echo server on loopback: it forwards and counts, adds latency without reordering, stalls on
seeded losses, holds bytes while blackholed and delivers them on heal, resets connections,
and stops cleanly. Timing bounds are generous lower bounds (the faults' own durations)."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support.fault_proxy import FaultProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(ConnectionResetError):  # the reset tests' doing
            while data := self.request.recv(65536):
                self.request.sendall(data)


@pytest.fixture(scope="module")
def echo() -> Iterator[str]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(echo: str) -> Iterator[FaultProxy]:
    with FaultProxy(echo, seed=7, rto_s=0.05) as p:
        yield p


def _connect(proxy: FaultProxy, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = sock.recv(n - len(out))
        assert data, f"EOF after {len(out)}/{n} bytes"
        out += data
    return out


def _ping(sock: socket.socket, message: bytes) -> float:
    start = time.monotonic()
    sock.sendall(message)
    assert _recv_exactly(sock, len(message)) == message
    return time.monotonic() - start


def test_forwards_both_ways_passes_the_half_close_and_counts(proxy: FaultProxy) -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB: several chunks
    with _connect(proxy) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # the echo server sees EOF and closes its side
        got = b""
        while data := sock.recv(65536):
            got += data
    assert got == payload
    stats = proxy.stats()
    assert (stats.connections, stats.bytes_up, stats.bytes_down) == (1, len(payload), len(payload))
    assert stats.losses == 0


def test_latency_is_added_each_way_and_never_reorders(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        assert _ping(sock, b"warm") < 1.0
        proxy.latency_s = 0.1
        assert _ping(sock, b"slow") >= 0.2  # one-way delay, both ways: a round trip of 0.2 s
        proxy.latency_s = 0.3
        sock.sendall(b"first.")
        time.sleep(0.05)
        proxy.latency_s = 0.0  # a later chunk with less delay still leaves after the first
        sock.sendall(b"second")
        assert _recv_exactly(sock, 12) == b"first.second"


def _lossy_pings(echo: str, seed: int) -> tuple[int, float]:
    with FaultProxy(echo, seed=seed, rto_s=0.005) as p:
        p.loss = 0.3
        with _connect(p) as sock:
            elapsed = sum(_ping(sock, f"{i:04d}".encode()) for i in range(30))
        stats = p.stats()
    assert elapsed >= stats.stall_s  # every stall was waited out, in order
    return stats.losses, stats.stall_s


def test_losses_stall_by_doubling_timeouts_and_are_seeded(echo: str) -> None:
    losses, stall = _lossy_pings(echo, 1)
    assert _lossy_pings(echo, 1) == (losses, stall)  # the n-th chunk's fate is the seed's
    assert losses > 0 and stall >= 0.005 * losses  # each loss waits one timeout at least
    assert {_lossy_pings(echo, s) for s in (2, 3, 4)} != {(losses, stall)}


def test_blackhole_holds_both_ways_with_connections_open_and_heal_delivers(
    proxy: FaultProxy,
) -> None:
    with _connect(proxy, timeout=0.3) as sock:
        _ping(sock, b"before")
        proxy.blackhole()
        assert proxy.blackholed
        sock.sendall(b"held")
        with pytest.raises(TimeoutError):
            sock.recv(16)
        late = _connect(proxy, timeout=0.3)  # the port answers; upstream sees it after the heal
        late.sendall(b"late")
        with pytest.raises(TimeoutError):
            late.recv(16)
        assert proxy.stats().bytes_up == len(b"before")
        proxy.heal()
        sock.settimeout(5)
        late.settimeout(5)
        assert _recv_exactly(sock, 4) == b"held"
        assert _recv_exactly(late, 4) == b"late"
        late.close()


def _wait_until_blackholed(proxy: FaultProxy) -> None:
    deadline = time.monotonic() + 5
    while not proxy.blackholed:
        assert time.monotonic() < deadline, "the armed blackhole never started"
        time.sleep(0.01)


def test_blackhole_after_bytes_cuts_mid_message(proxy: FaultProxy) -> None:
    with _connect(proxy, timeout=5) as sock:
        proxy.blackhole(after_bytes=10)
        assert not proxy.blackholed
        sock.sendall(b"0123456789abcdefghij")
        _wait_until_blackholed(proxy)
        time.sleep(0.1)
        assert proxy.stats().bytes_up == 10
        proxy.heal()
        assert _recv_exactly(sock, 20) == b"0123456789abcdefghij"


def test_reset_all_resets_every_connection_and_the_port_stays(proxy: FaultProxy) -> None:
    with _connect(proxy) as a, _connect(proxy) as b:
        _ping(a, b"a")
        _ping(b, b"b")
        assert proxy.reset_all() == 2
        for sock in (a, b):
            with pytest.raises(ConnectionResetError):
                sock.sendall(b"x")
                sock.recv(16)
    assert proxy.stats().resets == 2
    with _connect(proxy) as c:
        _ping(c, b"again")
    assert proxy.stats().connections == 3


def test_stop_closes_the_port_and_its_connections(echo: str) -> None:
    p = FaultProxy(echo).start()
    sock = _connect(p)
    _ping(sock, b"x")
    p.stop()
    with contextlib.suppress(ConnectionResetError):  # reset, or closed: either way it is over
        assert sock.recv(16) == b""
    with pytest.raises(ConnectionRefusedError):
        _connect(p).close()
    sock.close()
    assert not any(t.name == "fault-proxy" for t in threading.enumerate())
