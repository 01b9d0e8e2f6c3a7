"""The keepalive options every channel and server takes: the ack wait gRPC really uses is set
with the keepalive timeout, and a stream reader keeps pinging."""

from __future__ import annotations

from core.keepalive import keepalive_options


def test_the_ping_timeout_follows_the_keepalive_timeout() -> None:
    options = dict(keepalive_options(10.0, 5.0))
    assert options == {
        "grpc.keepalive_time_ms": 10_000,
        "grpc.keepalive_timeout_ms": 5_000,
        "grpc.http2.ping_timeout_ms": 5_000,
    }


def test_a_stream_reader_pings_without_sending_data_and_zero_means_no_pings() -> None:
    assert (
        dict(keepalive_options(1.0, 1.0, reads_streams=True))["grpc.http2.max_pings_without_data"]
        == 0
    )
    assert keepalive_options(0.0, 10.0, reads_streams=True) == []
