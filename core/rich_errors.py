"""gRPC statuses with a ``google.rpc.RetryInfo`` detail (through grpcio-status), both ways.

Servers send one with RESOURCE_EXHAUSTED to say when a retry may succeed; the gateway passes a
worker's hint on, and the client SDK waits that long before retrying.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status


def rich_status(
    code: grpc.StatusCode, message: str, retry_after_s: float | None = None
) -> grpc.Status:
    """A status with a RetryInfo detail when ``retry_after_s`` is given."""
    details = []
    if retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(max(0.0, retry_after_s) * 1e9))
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(detail)
    return rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=message, details=details)
    )


def retry_after_of(exc: grpc.RpcError) -> float | None:
    """The RetryInfo delay a failed call carries, in seconds (None without one)."""
    try:
        status = rpc_status.from_call(exc)
    except (ValueError, AttributeError, TypeError):
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None
