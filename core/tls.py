"""TLS for every gRPC hop: server credentials, channel credentials, and their flags' values.

One :class:`TLSConfig` describes one side of a hop (client --TLS--> gateway --mTLS--> workers).
A server presents ``cert``/``key`` and, with ``require_client_cert``, admits only clients with a
certificate signed by ``ca`` (mutual TLS: how workers admit only the gateway). A client verifies
the server against ``ca`` (the system roots when unset) and presents ``cert``/``key`` if given.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


class TLSConfigError(ValueError):
    """A certificate or key file is missing, unreadable, or given without its partner."""


@dataclass(frozen=True)
class TLSConfig:
    """One side of a hop. ``cert`` and ``key`` come together, and ``require_client_cert`` needs
    ``ca`` (else :class:`TLSConfigError`)."""

    cert: Path | None = None
    """PEM certificate chain this side presents (a server's, or a client's for mTLS)."""
    key: Path | None = None
    """PEM private key of ``cert``."""
    ca: Path | None = None
    """PEM bundle of CAs that sign the peer's certificate."""
    require_client_cert: bool = False
    """Server side: refuse clients without a certificate signed by ``ca`` (mutual TLS)."""
    server_name: str | None = None
    """Client side: the name to check the server's certificate against, instead of the address's
    host (an IP literal the certificate does not list, or a proxy in between)."""

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise TLSConfigError("a TLS certificate and its key must be given together")
        if self.require_client_cert and self.ca is None:
            raise TLSConfigError("requiring client certificates needs a CA bundle to check them")

    def client_ssl_context(self) -> ssl.SSLContext:
        """An HTTPS client's side of this config: ``ca`` (else the system roots) to check the
        server, ``cert``/``key`` to present for mutual TLS."""
        context = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        if self.cert is not None and self.key is not None:
            context.load_cert_chain(str(self.cert), str(self.key))
        return context

    def server_credentials(self) -> grpc.ServerCredentials:
        if self.cert is None or self.key is None:
            raise TLSConfigError("a TLS server needs a certificate and a key")
        return grpc.ssl_server_credentials(
            [(_read(self.key), _read(self.cert))],
            root_certificates=_read(self.ca) if self.ca is not None else None,
            require_client_auth=self.require_client_cert,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca) if self.ca is not None else None,
            private_key=_read(self.key) if self.key is not None else None,
            certificate_chain=_read(self.cert) if self.cert is not None else None,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read {path}: {exc.strerror}") from exc


def secure_channel(
    address: str, tls: TLSConfig | None, options: list[tuple[str, object]] | None = None
) -> grpc.aio.Channel:
    """An asyncio channel to ``address``: TLS when ``tls`` is given, plaintext otherwise."""
    opts: list[tuple[str, object]] = list(options or [])
    if tls is None:
        return grpc.aio.insecure_channel(address, options=opts)
    return grpc.aio.secure_channel(
        address, tls.channel_credentials(), options=[*opts, *tls.channel_options()]
    )


def sync_channel(
    address: str, tls: TLSConfig | None, options: list[tuple[str, object]] | None = None
) -> grpc.Channel:
    """A blocking channel to ``address`` (the sync client, readiness checks, tests)."""
    opts: list[tuple[str, object]] = list(options or [])
    if tls is None:
        return grpc.insecure_channel(address, options=opts)
    return grpc.secure_channel(
        address, tls.channel_credentials(), options=[*opts, *tls.channel_options()]
    )
