"""Port checks: a port that is taken (listening or merely bound) is reported with the error a
server's bind would get; a port whose last user left only TIME_WAIT connections is free; the
kernel's ephemeral range is read, and worker ports are tested against it."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from pdserve.ports import WORKER_BASE_PORT, bind_error, ephemeral_range, overlap


def test_a_taken_port_is_reported_and_a_free_one_is_not() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        error = bind_error("127.0.0.1", port)
        assert error is not None and error.errno == errno.EADDRINUSE
        held.listen()
        assert bind_error("127.0.0.1", port) is not None
        assert bind_error("0.0.0.0", port) is not None  # every interface includes loopback
    assert bind_error("127.0.0.1", port) is None
    assert bind_error("127.0.0.1", 0) is None


def test_time_wait_leftovers_do_not_count_as_taken() -> None:
    """A worker killed with connections open leaves them in TIME_WAIT; servers bind with
    SO_REUSEADDR, so its restart may take the port again, and the check must agree."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first: its end goes to TIME_WAIT
    client.close()
    server.close()
    assert bind_error("127.0.0.1", port) is None


def test_an_unknown_host_is_an_error_not_a_crash() -> None:
    assert bind_error("no-such-host.invalid", 1234) is not None


def test_the_ephemeral_range_is_read_and_compared(tmp_path: Path) -> None:
    path = tmp_path / "ip_local_port_range"
    path.write_text("32768\t60999\n")
    ephemeral = ephemeral_range(path)
    assert ephemeral == range(32768, 61000)
    assert overlap(range(WORKER_BASE_PORT, WORKER_BASE_PORT + 64), ephemeral) is None
    assert overlap(range(50061, 50070), ephemeral) == range(50061, 50070)
    assert overlap(range(32760, 32770), ephemeral) == range(32768, 32770)
    assert ephemeral_range(tmp_path / "missing") is None
    assert overlap(range(1, 5), None) is None
