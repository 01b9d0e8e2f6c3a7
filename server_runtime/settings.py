"""Settings every server process shares (logs, metrics, TLS, drain and keepalive), and the TLS
client settings
of ``pdserve generate`` and ``bench``; declared once, with what is built from them. Torch-free
(the gateway reads them; a worker's own are in :mod:`server_runtime.worker_settings`).

Secrets never come from a flag's value: bearer tokens from ``--auth-token-file`` or
``PDSERVE_AUTH_TOKEN``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from core.keepalive import keepalive_options
from core.settings import Group, Setting, env_value
from core.tls import TLSConfig

AUTH_TOKEN_ENV = "PDSERVE_AUTH_TOKEN"

LOG = Group(
    None,
    (
        Setting("--log-level", default="info"),
        Setting(
            "--log-format",
            choices=["auto", "json", "console"],
            default="auto",
            help="json lines, console text, or auto (console on a terminal)",
        ),
    ),
)

METRICS_PORT = Setting(
    "--metrics-port",
    type=int,
    default=0,
    help="port of the Prometheus /metrics endpoint (0: off)",
)

DRAIN = Group(
    None,
    (
        Setting(
            "--shutdown-grace",
            type=float,
            default=5.0,
            help="on SIGTERM: seconds work in flight may take to finish (new work is refused)",
        ),
        # How long a hung (not dead) peer can hold this server's calls: the kernel of a stopped
        # or wedged process still acknowledges TCP, so only an HTTP/2 ping finds it out.
        Setting(
            "--keepalive",
            type=float,
            default=10.0,
            help="seconds between the HTTP/2 pings this server sends each connected client; a "
            "client that answers none within --keepalive-timeout (hung, or cut off) loses its "
            "connection, and its calls end, freeing their KV and admission slots (0: no pings)",
        ),
        Setting(
            "--keepalive-timeout",
            type=float,
            default=10.0,
            help="seconds a client may take to answer a keepalive ping",
        ),
    ),
)
"""The SIGTERM grace and the keepalive: how a server lets go of work and of its peers."""

_TLS_KEY = Setting("--tls-key", type=Path, help="its PEM key")

SERVER_TLS = Group(
    "TLS",
    (
        Setting("--tls-cert", type=Path, help="PEM certificate: this server's"),
        _TLS_KEY,
        Setting(
            "--tls-ca",
            type=Path,
            help="PEM CA bundle that signs the peer's certificates (client certificates, with "
            "--tls-require-client-cert)",
        ),
        Setting(
            "--tls-require-client-cert",
            switch=True,
            help="refuse clients without a certificate signed by --tls-ca (mutual TLS)",
        ),
    ),
)

CLIENT_TLS = Group(
    "TLS",
    (
        Setting("--tls-cert", type=Path, help="PEM certificate: the client's (for mutual TLS)"),
        _TLS_KEY,
        Setting("--tls-ca", type=Path, help="PEM CA bundle that signs the peer's certificates"),
        Setting(
            "--tls",
            switch=True,
            help="use TLS with the system's CA roots (implied by --tls-ca)",
        ),
        Setting("--tls-server-name", help="name to check the server's certificate against"),
    ),
)


def server_tls(args: argparse.Namespace) -> TLSConfig | None:
    if args.tls_cert is None and args.tls_key is None:
        return None
    return TLSConfig(
        cert=args.tls_cert,
        key=args.tls_key,
        ca=args.tls_ca,
        require_client_cert=args.tls_require_client_cert,
    )


@dataclass(frozen=True)
class KeepAlive:
    """A server's pings to its clients (see ``--keepalive``); ``time_s`` 0: none."""

    time_s: float = 10.0
    timeout_s: float = 10.0

    def grpc_options(self) -> list[tuple[str, int]]:
        return keepalive_options(self.time_s, self.timeout_s)


def keepalive(args: argparse.Namespace) -> KeepAlive:
    return KeepAlive(float(args.keepalive), float(args.keepalive_timeout))


def client_tls(args: argparse.Namespace) -> TLSConfig | None:
    if not (args.tls or args.tls_ca or args.tls_cert):
        return None
    return TLSConfig(
        cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca, server_name=args.tls_server_name
    )


def auth_tokens(path: Path | None) -> tuple[str, ...]:
    """Tokens from ``path`` (one per line, ``#`` comments) and ``PDSERVE_AUTH_TOKEN``."""
    tokens: list[str] = []
    if path is not None:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.append(line)
    env = (env_value(AUTH_TOKEN_ENV) or "").strip()
    if env:
        tokens.append(env)
    return tuple(tokens)


def client_token(args: argparse.Namespace) -> str | None:
    """The bearer token a client sends: first of ``--auth-token-file``, else the environment."""
    tokens = auth_tokens(getattr(args, "auth_token_file", None))
    return tokens[0] if tokens else None
