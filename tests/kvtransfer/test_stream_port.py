"""The stream backend's page listener on a fixed port (``--kv-stream-port``), as a Kubernetes
NetworkPolicy that names ports needs it; port 0 keeps taking an ephemeral one."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from kvtransfer.datapath import Backend, StreamHost
from tests.kvtransfer.harness import Channel, Transport, random_pages, same_bits, tid


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
