"""Where the workers of a tier are: fixed addresses, and DNS names that resolve to many.

A target is either ``host:port`` (one worker; gRPC resolves the host itself) or
``dns:///name:port``: every address ``name`` resolves to is a worker (a Kubernetes headless
Service lists one address per ready pod), and the name is resolved again every
``resolve_interval_s`` so that pods that come and go are followed without a restart.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)

DNS_SCHEME = "dns:///"

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> the IP addresses the host resolves to (raises OSError when it does not)."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    dns: bool  # resolve ``host`` to many workers

    @staticmethod
    def parse(text: str) -> Target:
        dns = text.startswith(DNS_SCHEME)
        rest = text[len(DNS_SCHEME) :] if dns else text
        host, sep, port = rest.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"worker target {text!r} is not host:port or dns:///name:port")
        return Target(host.strip("[]") if dns else host, int(port), dns)

    def __str__(self) -> str:
        return f"{DNS_SCHEME}{self.host}:{self.port}" if self.dns else f"{self.host}:{self.port}"


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve_with_getaddrinfo(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


async def addresses_of(target: Target, resolve: Resolver) -> set[str] | None:
    """Worker addresses of ``target`` now; None when its name does not resolve (the caller
    keeps what it had: a DNS outage must not empty the fleet)."""
    if not target.dns:
        return {str(target)}
    try:
        ips = await resolve(target.host, target.port)
    except OSError as exc:
        log.warning("worker_dns_failed", target=str(target), error=str(exc))
        return None
    return {join_host_port(ip, target.port) for ip in ips}
