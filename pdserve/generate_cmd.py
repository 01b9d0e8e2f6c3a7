"""``pdserve generate``: stream one completion to the terminal."""

from __future__ import annotations

import argparse
import sys

import grpc

from pdserve.client import Client


def run_generate(args: argparse.Namespace) -> int:
    prompt_kwargs: dict[str, object] = (
        {"messages": [("user", args.prompt)]} if args.chat else {"prompt": args.prompt}
    )
    with Client(args.gateway) as client:
        try:
            last = None
            for chunk in client.generate(
                timeout=args.timeout,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
                stop=args.stop,
                **prompt_kwargs,
            ):
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
