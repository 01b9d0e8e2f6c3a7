"""Failures the gateway reports, each carrying the gRPC status code it maps to."""

from __future__ import annotations

import grpc

from engine.errors import EngineError


class UpstreamError(EngineError):
    """A worker call failed; ``code`` is what the client should see."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class NoWorkersError(EngineError):
    """No worker of a needed tier is configured or reachable (maps to UNAVAILABLE)."""
