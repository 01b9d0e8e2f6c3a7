"""``pdserve`` command line: run a tier, a whole local cluster, or stream a completion.

Every flag can also come from the environment as ``PDSERVE_<FLAG>`` (e.g. ``PDSERVE_MODEL``,
``PDSERVE_NO_PREFIX_CACHING=true``); a flag given on the command line wins. Each tier declares
its settings once, in its ``settings`` module (see :mod:`core.settings`); this module puts them
on its commands, and configuration is built from them, once, and passed down.

A server (gateway, prefill, decode) that has drained and stopped exits at once
(:func:`_exit_served`): the interpreter's own teardown (a garbage collection over torch's and
transformers' object graphs) took seconds on 2 busy cores, during which the process held its
port and a supervisor or kubelet waited.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from core.settings import add_settings
from decode_service import settings as decode_settings
from gateway import settings as gateway_settings
from pdserve import settings as pdserve_settings
from pdserve.bench.settings import BENCH
from prefill_service import settings as prefill_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve", description="Disaggregated LLM serving: prefill, decode and gateway tiers."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser(
        "up",
        help="start a local cluster: gateway + N prefill + M decode workers",
        description="Start a gateway, N prefill and M decode workers on this "
        "machine. Ctrl-C stops them all. A worker that dies is restarted on the same "
        "ports (with backoff; given up on after a crash loop) while the rest keep serving; "
        "the gateway's death stops the cluster (--fail-fast: any child's). "
        "--prefill 0 runs colocated (decode workers prefill).",
    )
    add_settings(up, *pdserve_settings.UP)

    gw = sub.add_parser(
        "gateway",
        help="run the public gRPC gateway",
        description="Serve pdserve.v1.Generation; route to the given workers.",
    )
    add_settings(gw, *gateway_settings.GROUPS)

    pf = sub.add_parser(
        "prefill",
        help="run a prefill worker",
        description="Compute prompts, return first tokens, push KV pages to the "
        "decode worker named in each request's ticket.",
    )
    add_settings(pf, *prefill_settings.GROUPS)

    dc = sub.add_parser(
        "decode",
        help="run a decode worker",
        description="Continuous batching over a paged KV pool; receives KV "
        "pages from prefill workers, or prefills locally (colocated).",
    )
    add_settings(dc, *decode_settings.GROUPS)

    gen = sub.add_parser(
        "generate",
        help="stream a completion from a gateway",
        description="Send PROMPT to a gateway and print the text as it streams.",
    )
    gen.add_argument("prompt")
    add_settings(gen, *pdserve_settings.GENERATE_GROUPS)

    bench = sub.add_parser(
        "bench",
        help="load a gateway and report vLLM-style serving metrics (or --compare)",
        description="Benchmark a gateway (TTFT, TPOT, ITL, E2E, throughput, goodput), or with "
        "--compare run the same requests through transformers and local pdserve clusters.",
    )
    add_settings(bench, *BENCH)
    return parser


def _configure_logs(args: argparse.Namespace, tier: str) -> None:
    from server_runtime.log_setup import configure_logging

    fmt = args.log_format
    configure_logging(args.log_level, None if fmt == "auto" else fmt == "json", tier=tier)


def _exit_served() -> NoReturn:
    """After a server stopped cleanly: flush what it wrote and leave without the teardown."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
            cfg = gateway_settings.gateway_config(args)
        except (ValueError, OSError) as exc:
            print(f"pdserve gateway: {exc}", file=sys.stderr)
            return 2
        asyncio.run(serve_gateway(cfg, grace_s=args.shutdown_grace))
        _exit_served()
    from server_runtime.worker_settings import worker_serve_options

    try:
        if args.command == "prefill":
            pcfg = prefill_settings.prefill_config(args)
        else:
            dcfg = decode_settings.decode_config(args)
        serve_options = worker_serve_options(args)
    except (ValueError, OSError) as exc:
        print(f"pdserve {args.command}: {exc}", file=sys.stderr)
        return 2
    if args.command == "prefill":
        from prefill_service.server import serve as serve_prefill

        asyncio.run(
            serve_prefill(
                pcfg,
                metrics_port=args.metrics_port,
                grace_s=args.shutdown_grace,
                options=serve_options,
            )
        )
        _exit_served()
    from decode_service.server import serve as serve_decode

    asyncio.run(
        serve_decode(
            dcfg, metrics_port=args.metrics_port, grace_s=args.shutdown_grace, options=serve_options
        )
    )
    _exit_served()


if __name__ == "__main__":
    sys.exit(main())
