"""The stream backend's page listener: on a fixed port (``--kv-stream-port``), as a Kubernetes
NetworkPolicy that names ports needs it, or an ephemeral one; and claimed only by a peer that
proves its token (on a keyed channel, with the fleet's key)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from kvtransfer import wire
from kvtransfer.datapath import Backend, StreamHost, StreamLink
from kvtransfer.stream_link import join_stream
from kvtransfer.wire import FrameAuth
from tests.kvtransfer.harness import KEY, Channel, Transport, random_pages, same_bits, tid


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed", "ephemeral"])
def test_offers_name_the_configured_port(fixed: bool) -> None:
    port = _free_port() if fixed else 0
    host = StreamHost("127.0.0.1", 5.0, None, port)
    try:
        offer = host.offer()
        assert offer["stream_host"] == "127.0.0.1"
        offered = offer["stream_port"]
        assert isinstance(offered, int) and (offered == port if fixed else offered > 0)
        assert host.offer()["stream_port"] == offered  # one listener for every peer
    finally:
        host.close()


def test_pages_arrive_over_a_fixed_port(tmp_path: Path) -> None:
    port = _free_port()
    ch = Channel(Transport("stream", Backend.STREAM, tmp_path), stream_port=port)
    try:
        pages = random_pages(ch.receiver_fp, 2, seed=3)
        ch.receiver.expect(tid(1), "req", [1, 2], 60.0)
        ch.send("snd", tid(1), [1, 2], pages)
        assert ch.rec.wait_ready("req") == 7
        assert same_bits(ch.dst.kv[:, :, [1, 2]], pages)
        with socket.create_connection(("127.0.0.1", port), timeout=2.0):
            pass  # the page listener is there (it drops a connection without a token)
    finally:
        ch.close()


def test_a_fixed_port_already_taken_fails_at_once() -> None:
    """Not at the first handshake, where it would look like a peer's problem."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(OSError):
            StreamHost("127.0.0.1", 1.0, None, taken.getsockname()[1])


def test_a_port_outside_the_range_is_refused() -> None:
    for port in (-1, 65536):
        with pytest.raises(ValueError, match="not a TCP port"):
            StreamHost("127.0.0.1", 1.0, None, port)


def test_proofs() -> None:
    token = bytes(range(16))
    assert FrameAuth(None).stream_proof(token) == token
    keyed = FrameAuth(KEY).stream_proof(token)
    assert len(keyed) == len(token) and keyed != token
    assert keyed == FrameAuth(KEY).stream_proof(token)
    assert keyed != FrameAuth(KEY + b"-other").stream_proof(token)


def test_a_token_read_off_the_wire_does_not_claim_a_keyed_link() -> None:
    auth = FrameAuth(KEY)
    host = StreamHost("127.0.0.1", 5.0, None, 0, auth.stream_proof)
    try:
        offer = host.offer()
        address = (str(offer["stream_host"]), int(str(offer["stream_port"])))
        with socket.create_connection(address, timeout=5.0) as eavesdropper:
            eavesdropper.sendall(bytes.fromhex(str(offer["token"])))  # the token, no proof
            assert eavesdropper.recv(1) == b""  # closed by the host
        joined = join_stream(offer, 5.0, auth.stream_proof)
        accepted = host.accept(offer)
        assert isinstance(accepted, StreamLink)
        joined.sock.sendall(b"page")
        assert bytes(accepted.read_bytes(4)) == b"page"
        joined.close()
        accepted.close()
    finally:
        host.close()


FAST_S = 3.0  # under the rendezvous timeout (GROUP_TIMEOUT_S), generous for two cores
BOGUS_HELLOS = 8  # twice the receiver's rendezvous workers of old


def test_hellos_whose_stream_never_joins_delay_no_real_transfer(tmp_path: Path) -> None:
    """Peers welcomed (each offered a stream) that never connect it tie up nothing: a real
    sender's transfer right after them completes at once, not after their rendezvous
    timeouts (it took two of them, 10 s, when each pending accept held a worker thread)."""
    ch = Channel(Transport("stream", Backend.STREAM, tmp_path))
    try:
        bogus = [ch.raw_peer() for _ in range(BOGUS_HELLOS)]
        for peer in bogus:
            peer.sock.send(peer.hello_frame())
        for peer in bogus:  # WELCOMEs, each with an offer nobody takes up
            reply = peer.recv()
            assert isinstance(reply, wire.HandshakeHeader) and "rendezvous" in reply.fields
        pages = random_pages(ch.receiver_fp, 2, seed=41)
        ch.receiver.expect(tid(1), "r", [1, 2], 60.0)
        started = time.monotonic()
        ch.send("s", tid(1), [1, 2], pages)
        assert ch.rec.wait_ready("r") == 7
        assert time.monotonic() - started < FAST_S
        assert same_bits(ch.dst.kv[:, :, [1, 2]], pages)
    finally:
        ch.close()


SILENT_CONNECTIONS = 4


def test_connections_that_never_prove_a_token_delay_no_real_transfer(tmp_path: Path) -> None:
    """Connections to the page listener that say nothing (a port scan, a TCP health probe) or
    too little hold up no real sender's join: each took the accepting thread for 2 s."""
    ch = Channel(Transport("stream", Backend.STREAM, tmp_path))
    try:
        peer = ch.raw_peer()
        offer = peer.handshake().fields["rendezvous"]  # the listener is up
        silent = [socket.create_connection((offer["stream_host"], offer["stream_port"]))]
        silent += [
            socket.create_connection((offer["stream_host"], offer["stream_port"]))
            for _ in range(SILENT_CONNECTIONS - 1)
        ]
        silent[-1].sendall(b"\x01\x02")  # a few bytes of no proof
        time.sleep(0.1)  # all of them accepted before the real join
        pages = random_pages(ch.receiver_fp, 2, seed=42)
        ch.receiver.expect(tid(1), "r", [1, 2], 60.0)
        started = time.monotonic()
        ch.send("s", tid(1), [1, 2], pages)
        assert ch.rec.wait_ready("r") == 7
        assert time.monotonic() - started < FAST_S
        for conn in silent:
            conn.close()
    finally:
        ch.close()
