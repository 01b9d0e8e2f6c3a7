"""Which ports a local cluster may take: whether a port can be bound right now, and the
kernel's ephemeral range (where any outgoing connection may be holding one).

``pdserve up`` checks every port a child will bind before it starts the child, so a port
that is taken is reported at once, naming the child, the port and the error, instead of
surfacing as a child that dies (or hangs) at start with its reason buried in its own log.
The check binds the way the servers do (``SO_REUSEADDR``: a port whose only users are
connections in TIME_WAIT, say of the previous run of the same worker, counts as free) and
releases the port at once; a port taken between the check and the child's own bind is
still possible, and then the child's exit is what the launcher sees.
"""

from __future__ import annotations

import socket
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
WORKER_BASE_PORT = 20061
"""``pdserve up``'s first worker port: below Linux's default ephemeral range (32768-60999),
from which the kernel hands out the local ports of outgoing connections, and below
Kubernetes' NodePort range (30000-32767), so nothing on the machine holds one by chance."""


def bind_error(host: str, port: int) -> OSError | None:
    """The error binding ``host:port`` gives now (None: it is free). Port 0 is always free."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc
    return None


def ephemeral_range(path: Path = EPHEMERAL_RANGE_FILE) -> range | None:
    """The kernel's ephemeral port range (``range(low, high + 1)``), None where unknown."""
    try:
        low, high = (int(word) for word in path.read_text().split())
    except (OSError, ValueError):
        return None
    return range(low, high + 1)


def overlap(ports: range, ephemeral: range | None) -> range | None:
    """The part of ``ports`` inside ``ephemeral`` (None when they do not meet)."""
    if ephemeral is None:
        return None
    low, high = max(ports.start, ephemeral.start), min(ports.stop, ephemeral.stop)
    return range(low, high) if low < high else None
