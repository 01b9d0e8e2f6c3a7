"""Command-line flags of the serving fleet (gateway routing, admission, failover, TLS, auth,
drain) and the configuration built from them. ``pdserve.cli`` adds these to its commands.

As everywhere in the CLI, each flag may also come from ``PDSERVE_<FLAG>``; secrets come from
files (``--auth-token-file``) or from ``PDSERVE_AUTH_TOKEN``, never from a flag's value.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from core.tls import TLSConfig

ENV_PREFIX = "PDSERVE_"
AUTH_TOKEN_ENV = ENV_PREFIX + "AUTH_TOKEN"


def _env(flag: str, default: Any) -> Any:
    return os.environ.get(ENV_PREFIX + flag.upper().replace("-", "_"), default)


def add_tls_flags(p: argparse.ArgumentParser, *, server: bool = True) -> None:
    g = p.add_argument_group("TLS")
    what = "this server's" if server else "the client's (for mutual TLS)"
    g.add_argument(
        "--tls-cert", type=Path, default=_env("tls_cert", None), help=f"PEM certificate: {what}"
    )
    g.add_argument("--tls-key", type=Path, default=_env("tls_key", None), help="its PEM key")
    g.add_argument(
        "--tls-ca",
        type=Path,
        default=_env("tls_ca", None),
        help="PEM CA bundle that signs the peer's certificates"
        + (" (client certificates, with --tls-require-client-cert)" if server else ""),
    )
    if server:
        g.add_argument(
            "--tls-require-client-cert",
            action="store_true",
            default=bool(_env("tls_require_client_cert", "")),
            help="refuse clients without a certificate signed by --tls-ca (mutual TLS)",
        )
    else:
        g.add_argument(
            "--tls",
            action="store_true",
            help="use TLS with the system's CA roots (implied by --tls-ca)",
        )
        g.add_argument(
            "--tls-server-name",
            default=_env("tls_server_name", None),
            help="name to check the server's certificate against",
        )


def add_drain_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=_env("shutdown_grace", 5.0),
        help="on SIGTERM: seconds work in flight may take to finish (new work is refused)",
    )


def add_worker_admission_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-queue",
        type=int,
        default=_env("max_queue", 256),
        help="requests that may wait beyond --max-num-seqs; past that RESOURCE_EXHAUSTED (0: "
        "no bound)",
    )


def add_gateway_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("routing and fleet")
    g.add_argument(
        "--router",
        choices=["load-aware", "round-robin"],
        default=_env("router", "load-aware"),
        help="load-aware: decode least loaded, prefill shortest queue with prefix affinity",
    )
    g.add_argument(
        "--local-prefill-below",
        type=int,
        default=_env("local_prefill_below", 0),
        help="prompts with fewer tokens prefill on the decode worker (0: never)",
    )
    g.add_argument(
        "--prefill-saturated-queue",
        type=int,
        default=_env("prefill_saturated_queue", 0),
        help="when every prefill worker has this many prompts, prefill on a decode worker "
        "with headroom (0: never)",
    )
    g.add_argument(
        "--max-attempts",
        type=int,
        default=_env("max_attempts", 4),
        help="routes tried per request: failed prefills retried, broken streams resumed",
    )
    g.add_argument(
        "--load-interval-ms",
        type=int,
        default=_env("load_interval_ms", 250),
        help="how often each worker reports its load",
    )
    g.add_argument(
        "--stale-after",
        type=float,
        default=_env("stale_after", 1.5),
        help="seconds without a load report before a worker stops receiving work",
    )
    g.add_argument(
        "--resolve-interval",
        type=float,
        default=_env("resolve_interval", 5.0),
        help="seconds between DNS resolutions of dns:///name:port worker targets",
    )
    a = p.add_argument_group("admission")
    a.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=_env("max_concurrent_requests", 256),
        help="requests streaming at once (0: no bound)",
    )
    a.add_argument(
        "--max-queued-requests",
        type=int,
        default=_env("max_queued_requests", 256),
        help="requests waiting for a slot; past that RESOURCE_EXHAUSTED with a retry delay",
    )
    a.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=_env("max_prompt_tokens", 0),
        help="refuse longer prompts with INVALID_ARGUMENT (0: the context length bounds them)",
    )
    a.add_argument(
        "--retry-after-ms",
        type=int,
        default=_env("retry_after_ms", 500),
        help="the retry delay sent with RESOURCE_EXHAUSTED",
    )
    s = p.add_argument_group("security")
    s.add_argument(
        "--auth-token-file",
        type=Path,
        default=_env("auth_token_file", None),
        help=f"file of accepted bearer tokens, one per line (or set {AUTH_TOKEN_ENV}); "
        "requests without one get UNAUTHENTICATED",
    )
    s.add_argument(
        "--upstream-tls-ca",
        type=Path,
        default=_env("upstream_tls_ca", None),
        help="CA that signs the workers' certificates: TLS towards workers",
    )
    s.add_argument(
        "--upstream-tls-cert",
        type=Path,
        default=_env("upstream_tls_cert", None),
        help="this gateway's client certificate towards workers (mutual TLS)",
    )
    s.add_argument(
        "--upstream-tls-key",
        type=Path,
        default=_env("upstream_tls_key", None),
        help="its PEM key",
    )
    s.add_argument(
        "--upstream-tls-server-name",
        default=_env("upstream_tls_server_name", None),
        help="name to check workers' certificates against (default: the address's host)",
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


def client_tls(args: argparse.Namespace) -> TLSConfig | None:
    if not (args.tls or args.tls_ca or args.tls_cert):
        return None
    return TLSConfig(
        cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca, server_name=args.tls_server_name
    )


def upstream_tls(args: argparse.Namespace) -> TLSConfig | None:
    if args.upstream_tls_ca is None and args.upstream_tls_cert is None:
        return None
    return TLSConfig(
        cert=args.upstream_tls_cert,
        key=args.upstream_tls_key,
        ca=args.upstream_tls_ca,
        server_name=args.upstream_tls_server_name,
    )


def auth_tokens(path: Path | None) -> tuple[str, ...]:
    """Tokens from ``path`` (one per line, ``#`` comments) and ``PDSERVE_AUTH_TOKEN``."""
    tokens: list[str] = []
    if path is not None:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.append(line)
    env = os.environ.get(AUTH_TOKEN_ENV, "").strip()
    if env:
        tokens.append(env)
    return tuple(tokens)


def client_token(args: argparse.Namespace) -> str | None:
    """The bearer token a client sends: first of ``--auth-token-file``, else the environment."""
    tokens = auth_tokens(getattr(args, "auth_token_file", None))
    return tokens[0] if tokens else None


def gateway_config(
    args: argparse.Namespace, model: Any, prefill: tuple[str, ...], decode: tuple[str, ...]
) -> Any:
    """The gateway's configuration from its flags (imports the gateway lazily)."""
    from gateway.generation import FailoverConfig
    from gateway.router import RoutingConfig
    from gateway.server import AdmissionConfig, FleetConfig, GatewayConfig, SecurityConfig

    return GatewayConfig(
        model=model,
        listen=args.listen,
        prefill=prefill,
        decode=decode,
        metrics_port=args.metrics_port,
        routing=RoutingConfig(
            policy=args.router,
            local_prefill_below=int(args.local_prefill_below),
            prefill_saturated_queue=int(args.prefill_saturated_queue),
        ),
        fleet=FleetConfig(
            load_interval_ms=int(args.load_interval_ms),
            stale_after_s=float(args.stale_after),
            resolve_interval_s=float(args.resolve_interval),
        ),
        admission=AdmissionConfig(
            max_concurrent_requests=int(args.max_concurrent_requests),
            max_queued_requests=int(args.max_queued_requests),
            max_prompt_tokens=int(args.max_prompt_tokens),
            retry_after_s=int(args.retry_after_ms) / 1000,
        ),
        failover=FailoverConfig(max_attempts=max(1, int(args.max_attempts))),
        security=SecurityConfig(
            tls=server_tls(args),
            upstream_tls=upstream_tls(args),
            auth_tokens=auth_tokens(args.auth_token_file),
        ),
    )


def worker_serve_options(args: argparse.Namespace) -> Any:
    from server_runtime.worker_runtime import ServeOptions

    return ServeOptions(tls=server_tls(args), max_queue=int(args.max_queue))


_GATEWAY_PASSTHROUGH = (
    "router",
    "local_prefill_below",
    "prefill_saturated_queue",
    "max_attempts",
    "load_interval_ms",
    "stale_after",
    "resolve_interval",
    "max_concurrent_requests",
    "max_queued_requests",
    "max_prompt_tokens",
    "retry_after_ms",
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def gateway_argv(args: argparse.Namespace) -> list[str]:
    """``pdserve up``'s gateway flags, as the gateway's command line (TLS excluded)."""
    argv: list[str] = []
    for name in _GATEWAY_PASSTHROUGH:
        argv += [_flag(name), str(getattr(args, name))]
    if args.auth_token_file is not None:
        argv += ["--auth-token-file", str(args.auth_token_file)]
    return argv


def cluster_tls_argv(args: argparse.Namespace, role: str) -> list[str]:
    """TLS flags of one ``pdserve up`` child: every hop uses ``--tls-cert``/``--tls-key``;
    workers require the gateway's client certificate (mTLS between tiers); the public side
    requires one only with ``--tls-require-client-cert``."""
    if args.tls_cert is None:
        return []
    pair = ["--tls-cert", str(args.tls_cert), "--tls-key", str(args.tls_key)]
    ca = ["--tls-ca", str(args.tls_ca)] if args.tls_ca else []
    if role == "gateway":
        argv = [*pair, *ca]
        if args.tls_require_client_cert:
            argv.append("--tls-require-client-cert")
        if args.tls_ca:
            argv += ["--upstream-tls-ca", str(args.tls_ca)]
            argv += ["--upstream-tls-cert", str(args.tls_cert)]
            argv += ["--upstream-tls-key", str(args.tls_key)]
        return argv
    return [*pair, *ca, *(["--tls-require-client-cert"] if args.tls_ca else [])]
