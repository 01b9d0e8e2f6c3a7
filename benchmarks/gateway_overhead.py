"""What the gateway costs per token, against a synthetic decode worker (no model), in one run.

    .venv/bin/python benchmarks/gateway_overhead.py --model /path/to/tiny-model-folder

1. **Added latency per token.** The synthetic worker emits each token exactly on a grid of
   CLOCK_MONOTONIC (every ``--grid-ms``), which every process on the machine shares, so a
   client's receive time modulo the grid is that token's delivery latency. Measured calling the
   worker directly (``Decode.Generate``), through the gateway's gRPC API, and through its
   OpenAI-compatible HTTP API (``POST /v1/completions``, ``stream: true``, read by an
   ``httpx`` client parsing the SSE with ``pdserve bench``'s parser; every event with text is a
   token), at 1 and at ``--streams`` concurrent streams; the difference of the percentiles is
   what the gateway adds, and ``http - grpc`` what the HTTP API adds on top of gRPC.
2. **Relay throughput.** The worker streams tokens as fast as it can; the gateway, pinned to one
   core (``taskset``), relays them to ``--streams`` concurrent clients: tokens/s received.

The gateway only needs the model's tokenizer and config (``--model``: any local folder; a tiny
test model is enough). Not a test: prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from core.pool_stats import PoolStats
from pdserve.bench.openai_http import make_client, served_model
from pdserve.bench.runner import ClientOptions
from pdserve.bench.sse import SseParser
from pdserve.client import AsyncClient
from pdserve.local_cluster import free_port_range
from protos.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from server_runtime.grpc_runtime import serve_until_signalled, start_server
from server_runtime.proto_convert import status_to_proto

DECODE_SERVICE = "pdserve.v1.Decode"


class SyntheticDecode(worker_pb2_grpc.DecodeServicer):
    """Streams ``max_tokens`` token ids (no model): on the grid, or as fast as it can."""

    def __init__(self, grid_s: float) -> None:
        self.grid_s = grid_s
        self.running = 0

    async def Generate(
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        n = request.sampling.max_tokens
        self.running += 1
        try:
            for k in range(n):
                if self.grid_s:
                    now = time.monotonic()
                    await asyncio.sleep((-now) % self.grid_s)
                elif k % 16 == 0:
                    await asyncio.sleep(0)
                last = k == n - 1
                yield worker_pb2.DecodeResponse(
                    tokens=worker_pb2.TokenChunk(
                        token_ids=[3 + k % 200],
                        finish_reason=(
                            common_pb2.FINISH_REASON_LENGTH
                            if last
                            else common_pb2.FINISH_REASON_UNSPECIFIED
                        ),
                        completion_tokens=k + 1,
                    )
                )
        finally:
            self.running -= 1

    def _status(self) -> worker_pb2.WorkerStatus:
        stats = PoolStats(1024, 1024, self.running, 0, 0, True, 0)
        msg = status_to_proto("decode", "synthetic", stats, 16, 0)
        msg.serving = True
        msg.max_num_seqs = 1024
        return msg

    async def GetStatus(
        self, request: worker_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerStatus:
        return self._status()

    async def WatchLoad(
        self, request: worker_pb2.WatchLoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.WorkerStatus]:
        while True:
            yield self._status()
            await asyncio.sleep(max(request.interval_ms, 50) / 1000)


async def serve_synthetic(listen: str, grid_s: float) -> None:
    servicer = SyntheticDecode(grid_s)
    handle = await start_server(
        listen,
        [DECODE_SERVICE],
        [functools.partial(worker_pb2_grpc.add_DecodeServicer_to_server, servicer)],
    )
    await serve_until_signalled(handle, [DECODE_SERVICE], 1.0)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def direct_latencies(address: str, streams: int, tokens: int, grid_s: float) -> list[float]:
    out: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.DecodeStub(channel)

        async def one() -> None:
            request = worker_pb2.DecodeRequest(
                request_id="direct",
                prompt_token_ids=[5, 6, 7],
                sampling=common_pb2.SamplingParams(max_tokens=tokens),
                mode=worker_pb2.PREFILL_MODE_LOCAL,
            )
            async for _ in stub.Generate(request):
                out.append(time.monotonic() % grid_s)

        await asyncio.gather(*[one() for _ in range(streams)])
    return out


async def gateway_latencies(address: str, streams: int, tokens: int, grid_s: float) -> list[float]:
    out: list[float] = []
    async with AsyncClient(address) as client:

        async def one() -> None:
            async for _ in client.generate(
                prompt_token_ids=[5, 6, 7], max_tokens=tokens, ignore_eos=True
            ):
                out.append(time.monotonic() % grid_s)

        await asyncio.gather(*[one() for _ in range(streams)])
    return out


async def http_latencies(base_url: str, streams: int, tokens: int, grid_s: float) -> list[float]:
    """Per-token delivery latency through the HTTP API: one keep-alive connection per stream
    (opened by the warm-up request), each SSE event with text is a token."""
    out: list[float] = []
    async with make_client(ClientOptions(), streams) as client:
        model = await served_model(client, base_url)
        body = {
            "model": model,
            "prompt": [5, 6, 7],
            "max_tokens": tokens,
            "ignore_eos": True,
            "stream": True,
        }

        async def one(n: int, record: bool) -> None:
            async with client.stream(
                "POST", f"{base_url}/completions", json={**body, "max_tokens": n}
            ) as response:
                response.raise_for_status()
                parser = SseParser()
                async for chunk in response.aiter_raw():
                    now = time.monotonic()
                    for data in parser.feed(chunk):
                        if record and data != "[DONE]" and json.loads(data)["choices"][0]["text"]:
                            out.append(now % grid_s)

        await asyncio.gather(*[one(2, False) for _ in range(streams)])  # open the connections
        await asyncio.gather(*[one(tokens, True) for _ in range(streams)])
    return out


async def relay_throughput(address: str, streams: int, tokens: int) -> float:
    async with AsyncClient(address) as client:
        received = 0

        async def one() -> None:
            nonlocal received
            async for chunk in client.generate(
                prompt_token_ids=[5, 6, 7], max_tokens=tokens, ignore_eos=True
            ):
                received += len(chunk.token_ids)

        start = time.monotonic()
        await asyncio.gather(*[one() for _ in range(streams)])
        return received / (time.monotonic() - start)


def _spawn(argv: list[str], core: int | None) -> subprocess.Popen[bytes]:
    if core is not None and shutil.which("taskset"):
        argv = ["taskset", "-c", str(core), *argv]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_serving(address: str) -> None:
    from pdserve.launcher import serving

    deadline = time.monotonic() + 120
    while not serving(address):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{address} not serving")
        time.sleep(0.2)


def _start_pair(model: str, grid_ms: float) -> tuple[str, str, str, list[subprocess.Popen[bytes]]]:
    """(worker, gateway, the gateway's HTTP API base URL up to /v1, processes)."""
    base = free_port_range(3)
    worker, gateway = f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"
    http = f"http://127.0.0.1:{base + 2}/v1"
    me = [sys.executable, str(Path(__file__).resolve())]
    procs = [_spawn([*me, "--worker", worker, "--grid-ms", str(grid_ms)], core=1)]
    gw = [sys.executable, "-m", "pdserve.cli", "gateway", "--listen", gateway, "--decode", worker]
    gw += ["--model", model, "--metrics-port", "0", "--log-level", "warning"]
    gw += ["--max-concurrent-requests", "0", "--http-port", str(base + 2)]
    procs.append(_spawn(gw, core=0))
    _wait_serving(worker)
    _wait_serving(gateway)
    return worker, gateway, http, procs


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local model folder (its tokenizer and config)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # run as the synthetic worker
    parser.add_argument("--grid-ms", type=float, default=20.0)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=200)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(serve_synthetic(args.worker, args.grid_ms / 1000))
        return
    if not args.model:
        parser.error("--model is required")
    grid = args.grid_ms / 1000
    worker, gateway, http, procs = _start_pair(args.model, args.grid_ms)
    quantiles = (0.5, 0.9, 0.99)
    try:
        asyncio.run(gateway_latencies(gateway, 2, 20, grid))  # warm up
        asyncio.run(http_latencies(http, 2, 20, grid))
        print(f"delivery latency per token (ms), worker emitting on a {args.grid_ms:g} ms grid")
        print(f"{'path':<14}{'streams':>8}{'tokens':>8}{'p50':>9}{'p90':>9}{'p99':>9}")
        for streams in (1, args.streams):
            rows = {
                "direct": asyncio.run(direct_latencies(worker, streams, args.tokens, grid)),
                "gateway grpc": asyncio.run(gateway_latencies(gateway, streams, args.tokens, grid)),
                "gateway http": asyncio.run(http_latencies(http, streams, args.tokens, grid)),
            }
            cells = {
                path: [_percentile(values, q) * 1000 for q in quantiles]
                for path, values in rows.items()
            }
            cells["http - grpc"] = [
                h - g for h, g in zip(cells["gateway http"], cells["gateway grpc"], strict=True)
            ]
            for path, ms in cells.items():
                n = len(rows[path]) if path in rows else ""
                print(f"{path:<14}{streams:>8}{n:>8}" + "".join(f"{v:>9.3f}" for v in ms))
    finally:
        _stop(procs)
    worker, gateway, _, procs = _start_pair(args.model, 0)
    try:
        asyncio.run(relay_throughput(gateway, 2, 50))  # warm up
        rate = asyncio.run(relay_throughput(gateway, args.streams, 1000))
        cores = "one core" if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else "no pin"
        print(f"relay: {rate:,.0f} tokens/s through the gateway ({cores}, {args.streams} streams)")
    finally:
        _stop(procs)


if __name__ == "__main__":
    main()
