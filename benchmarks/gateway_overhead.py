"""What the gateway costs per token, against a synthetic decode worker (no model), in one run.

    .venv/bin/python benchmarks/gateway_overhead.py --model /path/to/tiny-model-folder

1. **Added latency per token.** The synthetic worker emits each token exactly on a grid of
   CLOCK_MONOTONIC (every ``--grid-ms``), which every process on the machine shares, so a
   client's receive time modulo the grid is that token's delivery latency. Measured calling the
   worker directly (``Decode.Generate``) and through the gateway, at 1 and at ``--streams``
   concurrent streams; the difference of the percentiles is what the gateway adds.
2. **Relay throughput.** The worker streams tokens as fast as it can; the gateway, pinned to one
   core (``taskset``), relays them to ``--streams`` concurrent clients: tokens/s received.

The gateway only needs the model's tokenizer and config (``--model``: any local folder; a tiny
test model is enough). Not a test: prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from core.pool_stats import PoolStats
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
                        finish_reason=common_pb2.FINISH_REASON_LENGTH if last else 0,
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


def _start_pair(model: str, grid_ms: float) -> tuple[str, str, list[subprocess.Popen[bytes]]]:
    base = free_port_range(2)
    worker, gateway = f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"
    me = [sys.executable, str(Path(__file__).resolve())]
    procs = [_spawn([*me, "--worker", worker, "--grid-ms", str(grid_ms)], core=1)]
    gw = [sys.executable, "-m", "pdserve.cli", "gateway", "--listen", gateway, "--decode", worker]
    gw += ["--model", model, "--metrics-port", "0", "--log-level", "warning"]
    gw += ["--max-concurrent-requests", "0"]
    procs.append(_spawn(gw, core=0))
    _wait_serving(worker)
    _wait_serving(gateway)
    return worker, gateway, procs


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
    worker, gateway, procs = _start_pair(args.model, args.grid_ms)
    try:
        asyncio.run(gateway_latencies(gateway, 2, 20, grid))  # warm up
        print(f"delivery latency per token (ms), worker emitting on a {args.grid_ms:g} ms grid")
        print(f"{'path':<10}{'streams':>8}{'p50':>9}{'p99':>9}")
        for streams in (1, args.streams):
            rows = {
                "direct": asyncio.run(direct_latencies(worker, streams, args.tokens, grid)),
                "gateway": asyncio.run(gateway_latencies(gateway, streams, args.tokens, grid)),
            }
            for path, values in rows.items():
                p50, p99 = (_percentile(values, q) * 1000 for q in (0.5, 0.99))
                print(f"{path:<10}{streams:>8}{p50:>9.3f}{p99:>9.3f}")
    finally:
        _stop(procs)
    worker, gateway, procs = _start_pair(args.model, 0)
    try:
        asyncio.run(relay_throughput(gateway, 2, 50))  # warm up
        rate = asyncio.run(relay_throughput(gateway, args.streams, 1000))
        cores = "one core" if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else "no pin"
        print(f"relay: {rate:,.0f} tokens/s through the gateway ({cores}, {args.streams} streams)")
    finally:
        _stop(procs)


if __name__ == "__main__":
    main()
