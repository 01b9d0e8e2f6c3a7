"""``pdserve`` command line: run a tier, a whole local cluster, or stream a completion.

Every flag can also come from the environment as ``PDSERVE_<FLAG>`` (e.g. ``PDSERVE_MODEL``);
a flag given on the command line wins. Configuration is built here, once, and passed down.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from pdserve import serving_flags as fleet
from pdserve.bench.cli import add_bench_arguments
from pdserve.cli_flags import (
    add_engine_flags,
    add_log_flags,
    add_metrics_flag,
    add_model_flags,
    add_transfer_flags,
    engine_config,
    env_default,
    model_config,
    transfer_config,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve", description="Disaggregated LLM serving: prefill, decode and gateway tiers."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser(
        "up",
        help="start a local cluster: gateway + N prefill + M decode workers",
        description="Start a gateway, N prefill and M decode workers on this "
        "machine. Ctrl-C stops them all; a worker that dies is reported and "
        "stops the cluster. --prefill 0 runs colocated (decode workers prefill).",
    )
    up.add_argument("--prefill", type=int, default=1, help="prefill workers (0: colocated)")
    up.add_argument("--decode", type=int, default=1, help="decode workers")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=50051, help="gateway port")
    up.add_argument(
        "--worker-base-port",
        type=int,
        default=50061,
        help="first port for workers' gRPC and KV endpoints",
    )
    up.add_argument("--kv-transport", choices=["tcp", "ipc"], default="tcp")
    up.add_argument(
        "--generate",
        metavar="PROMPT",
        default=None,
        help="stream one completion of PROMPT, then stop the cluster",
    )
    up.add_argument("--max-tokens", type=int, default=64, help="with --generate")
    add_model_flags(up)
    add_engine_flags(up)
    add_transfer_flags(up)
    add_log_flags(up)
    fleet.add_gateway_flags(up)
    fleet.add_tls_flags(up)
    fleet.add_drain_flags(up)
    fleet.add_worker_admission_flags(up)
    up.add_argument(
        "--also-prefill",
        action="append",
        default=[],
        help="a prefill worker address the gateway also routes to (started elsewhere or later)",
    )
    up.add_argument(
        "--also-decode",
        action="append",
        default=[],
        help="a decode worker address the gateway also routes to (started elsewhere or later)",
    )
    up.add_argument(
        "--state-file",
        type=Path,
        default=None,
        help="write the children's names, pids, addresses and command lines here (JSON)",
    )
    up.add_argument(
        "--keep-going",
        action="store_true",
        help="a worker that dies is reported and the rest keep serving (the gateway routes "
        "around it); without it the cluster stops",
    )
    up.add_argument(
        "--pin-cpus",
        action="store_true",
        help="give each worker a CPU core of its own (round-robin over this process's cores), "
        "so a prefill never competes with decode for a core",
    )
    up.add_argument(
        "--metrics-base-port",
        type=int,
        default=0,
        help="serve /metrics: gateway on this port, workers on the next ones "
        "(prefill first, then decode); 0: off",
    )

    gw = sub.add_parser(
        "gateway",
        help="run the public gRPC gateway",
        description="Serve pdserve.v1.Generation; route to the given workers.",
    )
    gw.add_argument("--listen", default=env_default("listen", "127.0.0.1:50051"))
    gw.add_argument(
        "--prefill",
        action="append",
        default=[],
        help="prefill worker address (repeat, or comma-separate); none: colocated",
    )
    gw.add_argument(
        "--decode",
        action="append",
        default=[],
        help="decode worker address (repeat, or comma-separate)",
    )
    add_model_flags(gw)
    add_log_flags(gw)
    add_metrics_flag(gw, 9100)
    fleet.add_gateway_flags(gw)
    fleet.add_tls_flags(gw)
    fleet.add_drain_flags(gw)

    pf = sub.add_parser(
        "prefill",
        help="run a prefill worker",
        description="Compute prompts, return first tokens, push KV pages to the "
        "decode worker named in each request's ticket.",
    )
    pf.add_argument("--listen", default=env_default("listen", "127.0.0.1:50061"))
    add_transfer_flags(pf)
    add_model_flags(pf)
    add_engine_flags(pf)
    add_log_flags(pf)
    add_metrics_flag(pf, 9101)
    fleet.add_tls_flags(pf)
    fleet.add_drain_flags(pf)
    fleet.add_worker_admission_flags(pf)

    dc = sub.add_parser(
        "decode",
        help="run a decode worker",
        description="Continuous batching over a paged KV pool; receives KV "
        "pages from prefill workers, or prefills locally (colocated).",
    )
    dc.add_argument("--listen", default=env_default("listen", "127.0.0.1:50071"))
    dc.add_argument(
        "--kv-bind",
        default=env_default("kv_bind", "tcp://127.0.0.1:0"),
        help="ZeroMQ endpoint for incoming KV pages (tcp://host:port, ipc:///path)",
    )
    dc.add_argument(
        "--kv-advertise",
        default=env_default("kv_advertise", None),
        help="endpoint prefill workers should connect to (default: the bound one)",
    )
    dc.add_argument(
        "--kv-stream-port",
        type=_port,
        default=env_default("kv_stream_port", "0"),
        help="--kv-backend stream over tcp: the port the page listener binds on the advertised "
        "host (default 0: an ephemeral one, announced in each handshake)",
    )
    dc.add_argument(
        "--kv-lease-seconds",
        type=float,
        default=60.0,
        help="free a reservation whose pages have not all arrived by then",
    )
    add_transfer_flags(dc)
    add_model_flags(dc)
    add_engine_flags(dc)
    add_log_flags(dc)
    add_metrics_flag(dc, 9102)
    fleet.add_tls_flags(dc)
    fleet.add_drain_flags(dc)
    fleet.add_worker_admission_flags(dc)

    gen = sub.add_parser(
        "generate",
        help="stream a completion from a gateway",
        description="Send PROMPT to a gateway and print the text as it streams.",
    )
    gen.add_argument("prompt")
    gen.add_argument("--gateway", default=env_default("gateway", "127.0.0.1:50051"))
    gen.add_argument("--chat", action="store_true", help="send PROMPT as a user chat message")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    gen.add_argument(
        "--retries",
        type=int,
        default=3,
        help="retries on RESOURCE_EXHAUSTED before the first token (after the server's delay)",
    )
    gen.add_argument(
        "--auth-token-file",
        type=Path,
        default=env_default("auth_token_file", None),
        help="file whose first line is the bearer token (or set PDSERVE_AUTH_TOKEN)",
    )
    fleet.add_tls_flags(gen, server=False)

    bench = sub.add_parser(
        "bench",
        help="load a gateway and report vLLM-style serving metrics (or --compare)",
        description="Benchmark a gateway (TTFT, TPOT, ITL, E2E, throughput, goodput), or with "
        "--compare run the same requests through transformers and local pdserve clusters.",
    )
    add_bench_arguments(bench)
    return parser


def _port(text: str) -> int:
    """A TCP port, 0 (ephemeral) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0-65535")
    return port


def _split(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(a.strip() for v in values for a in v.split(",") if a.strip())


def _configure_logs(args: argparse.Namespace, tier: str) -> None:
    from server_runtime.log_setup import configure_logging

    fmt = args.log_format
    configure_logging(args.log_level, None if fmt == "auto" else fmt == "json", tier=tier)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from pdserve.bench.cli import run_bench

        return run_bench(args)
    if args.command == "generate":
        from pdserve.generate_cmd import run_generate

        return run_generate(args)
    _configure_logs(args, args.command)
    if args.command == "up":
        from pdserve.launcher import run_cluster

        return run_cluster(args)
    if args.command == "gateway":
        from gateway.server import serve as serve_gateway

        try:
            cfg = fleet.gateway_config(
                args, model_config(args), _split(args.prefill), _split(args.decode)
            )
        except (ValueError, OSError) as exc:
            print(f"pdserve gateway: {exc}", file=sys.stderr)
            return 2
        asyncio.run(serve_gateway(cfg, grace_s=args.shutdown_grace))
        return 0
    if args.command in ("prefill", "decode"):
        try:
            transfer_config(args)
            serve_options = fleet.worker_serve_options(args)
        except (ValueError, OSError) as exc:
            print(f"pdserve {args.command}: {exc}", file=sys.stderr)
            return 2
    if args.command == "prefill":
        from prefill_service.server import serve as serve_prefill
        from prefill_service.worker import PrefillConfig

        pcfg = PrefillConfig(
            engine=engine_config(args), transfer=transfer_config(args), listen=args.listen
        )
        asyncio.run(
            serve_prefill(
                pcfg,
                metrics_port=args.metrics_port,
                grace_s=args.shutdown_grace,
                options=serve_options,
            )
        )
        return 0
    from decode_service.server import serve as serve_decode
    from decode_service.worker import DecodeConfig

    dcfg = DecodeConfig(
        engine=engine_config(args),
        transfer=transfer_config(args),
        listen=args.listen,
        kv_bind=args.kv_bind,
        kv_advertise=args.kv_advertise,
        kv_lease_s=args.kv_lease_seconds,
        kv_stream_port=args.kv_stream_port,
    )
    asyncio.run(
        serve_decode(
            dcfg, metrics_port=args.metrics_port, grace_s=args.shutdown_grace, options=serve_options
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
