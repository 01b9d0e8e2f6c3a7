"""``pdserve generate``: stream one completion to the terminal."""

from __future__ import annotations

import argparse
import sys

import grpc

from core.tls import TLSConfig
from pdserve.client import Client, RequestOptions, RetryPolicy


def stream_completion(
    gateway: str,
    prompt: str | None,
    options: RequestOptions,
    timeout: float | None = None,
    *,
    tls: TLSConfig | None = None,
    token: str | None = None,
    retries: int = 3,
) -> int:
    """Print the text as it streams, then the finish reason and usage; returns an exit code."""
    last = None
    retry = RetryPolicy(max_attempts=1 + max(0, retries))
    with Client(gateway, tls=tls, token=token, retry=retry) as client:
        try:
            for chunk in client.generate(prompt, timeout=timeout, **options):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
        except grpc.RpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if last is not None:
        print(
            f"\n[finish_reason={last.finish_reason} prompt_tokens={last.prompt_tokens} "
            f"completion_tokens={last.completion_tokens}]",
            file=sys.stderr,
        )
    return 0


def run_generate(args: argparse.Namespace) -> int:
    options = RequestOptions(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
    )
    if args.chat:
        options["messages"] = [("user", args.prompt)]
    prompt = None if args.chat else args.prompt
    from server_runtime.settings import client_tls, client_token

    return stream_completion(
        args.gateway,
        prompt,
        options,
        args.timeout,
        tls=client_tls(args),
        token=client_token(args),
        retries=args.retries,
    )
