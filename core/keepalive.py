"""HTTP/2 keepalive pings, as gRPC has to be told them: one list of channel/server options for
the SDK, the gateway's worker channels and every server, so that a hung peer (its kernel still
acknowledging TCP) is found in ``time_s + timeout_s``.

Two gRPC defaults defeat a plain ``keepalive_time_ms``/``keepalive_timeout_ms`` pair: gRPC core
waits ``grpc.http2.ping_timeout_ms`` (60 s) for a ping's ack, whatever the keepalive timeout
says, and a side that only reads a stream sends no data frames, so it stops pinging after
``grpc.http2.max_pings_without_data`` (2) pings. Both are set here.
"""

from __future__ import annotations


def keepalive_options(
    time_s: float, timeout_s: float, *, reads_streams: bool = False
) -> list[tuple[str, int]]:
    """Options pinging every ``time_s`` and giving up on a peer that leaves a ping unanswered
    ``timeout_s``; ``reads_streams``: the side receives streams it sends nothing on (a client
    of streaming calls), so it must keep pinging without data. ``time_s`` 0: no pings."""
    if time_s <= 0:
        return []
    timeout_ms = int(timeout_s * 1000)
    options = [
        ("grpc.keepalive_time_ms", int(time_s * 1000)),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.ping_timeout_ms", timeout_ms),
    ]
    if reads_streams:
        options.append(("grpc.http2.max_pings_without_data", 0))
    return options
