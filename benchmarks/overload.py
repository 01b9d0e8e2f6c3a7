"""Overload: offer 5x what the fleet serves; the excess is refused, the admitted stay fast.

    .venv/bin/python benchmarks/overload.py [--mode disaggregated|colocated] [--model PATH]
        [--max-concurrent 8] [--max-queued 0] [--retry-after-ms 500] [--factor 5]
        [--requests 96] [--json overload.json]

Starts a real cluster (``pdserve up`` on loopback: 1 prefill + 1 decode worker, or one
colocated decode worker) whose gateway admits ``--max-concurrent`` requests at once, queues
``--max-queued`` more and refuses the rest with RESOURCE_EXHAUSTED and a ``--retry-after-ms``
RetryInfo hint (the gateway's ``--max-concurrent-requests``, ``--max-queued-requests`` and
``--retry-after-ms``). Every request is greedy with ``ignore_eos``, so it must stream exactly
its ``max_tokens``; no client ever retries (:data:`pdserve.client.NO_RETRY`). Two phases:

1. capacity (1x): ``--requests`` requests closed-loop at ``--max-concurrent`` in flight, what
   the fleet serves: requests/s and TTFT p50/p99. Nothing is refused (a call's slot is given
   back before its status reaches the client, so a closed loop never exceeds the limit);
2. overload (``--factor`` x): ``factor * --requests`` requests open-loop (Poisson) at ``factor``
   times the measured requests/s, about as long as phase 1.

Findings (exit 1): a refusal that is not RESOURCE_EXHAUSTED with a RetryInfo hint > 0; an
admitted request that fails or streams other than its ``max_tokens``; a refusal at 1x; an
admitted TTFT p50 or p99 at ``factor`` x above ``--max-ttft-ratio`` x the 1x figure plus
``--ttft-slack-ms`` (excess that queues instead of being refused shows as TTFT growing with
the backlog, up to the gateway's 30 s wait for a slot; the p50 catches it when noise inflates
the 1x p99, the maximum of a hundred samples); a pool not idle afterwards (KV blocks held, work
running, waiting or pending). ``--max-queued N`` shows what a bounded queue adds to TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Unpack

import grpc

from core.rich_errors import retry_after_of
from engine.config import DEFAULT_MODEL, ModelConfig
from engine.model_files import default_cache_dir, resolve_model_path
from pdserve.bench.datasets import BenchRequest, LengthRange, random_requests, usable_token_ids
from pdserve.bench.load import LoadSpec, run_load
from pdserve.bench.metrics import LatencyStats, RequestOutcome, compute_metrics
from pdserve.bench.stream import send_to_gateway
from pdserve.client import NO_RETRY, AsyncClient, Chunk, RequestOptions
from pdserve.local_cluster import Cluster, start_cluster
from protos.pdserve.v1 import worker_pb2

PERCENTILES = (50.0, 99.0)
IDLE_TIMEOUT_S = 30.0
INPUT_LEN = LengthRange(64, 256)
OUTPUT_LEN = LengthRange(32, 32)


@dataclass(frozen=True)
class OverloadOptions:
    """What one run offers; ``max_concurrent`` must be the gateway's admission limit."""

    max_concurrent: int = 8
    factor: float = 5.0
    requests: int = 96
    """Phase 1's requests; phase 2 offers ``factor`` times as many."""
    input_len: LengthRange = INPUT_LEN
    output_len: LengthRange = OUTPUT_LEN
    seed: int = 0
    max_ttft_ratio: float = 3.0
    ttft_slack_ms: float = 100.0
    timeout_s: float = 300.0
    """Deadline of each admitted request (none should come near it)."""
    progress: bool = True


def gateway_flags(max_concurrent: int, max_queued: int, retry_after_ms: int) -> tuple[str, ...]:
    """``pdserve up`` flags that set the gateway's admission limits."""
    return (
        "--max-concurrent-requests",
        str(max_concurrent),
        "--max-queued-requests",
        str(max_queued),
        "--retry-after-ms",
        str(retry_after_ms),
    )


def prompt_vocab(model_path: Path) -> list[int]:
    """Token ids random prompts are drawn from (the tokenizer's ordinary tokens)."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return usable_token_ids(tokenizer, AutoConfig.from_pretrained(model_path).vocab_size)


class _RecordingClient(AsyncClient):
    """An :class:`AsyncClient` that remembers, per asyncio task, the error its last call raised
    and the token ids it streamed (``send_to_gateway`` keeps only a description of the error,
    and the RetryInfo hint is in the error itself)."""

    def __init__(self, address: str) -> None:
        super().__init__(address, retry=NO_RETRY)
        self.errors: dict[asyncio.Task[Any] | None, grpc.RpcError] = {}
        self.streamed: Counter[asyncio.Task[Any] | None] = Counter()

    async def generate(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **options: Unpack[RequestOptions],
    ) -> AsyncIterator[Chunk]:
        task = asyncio.current_task()
        try:
            async for chunk in super().generate(prompt, timeout=timeout, **options):
                self.streamed[task] += len(chunk.token_ids)
                yield chunk
        except grpc.RpcError as exc:
            self.errors[task] = exc
            raise


@dataclass(frozen=True)
class Sent:
    """One request as the client saw it."""

    outcome: RequestOutcome
    wanted: int
    streamed: int
    code: str | None
    """The gRPC status name when the call failed, else None."""
    retry_after_s: float | None
    seconds: float
    """Sent to done (the refusal's round trip, for a refused call)."""

    @property
    def refused(self) -> bool:
        return self.code is not None and self.streamed == 0

    @property
    def complete(self) -> bool:
        return self.outcome.success and self.wanted == self.streamed == self.outcome.output_tokens


async def run_phase(
    address: str, requests: Sequence[BenchRequest], load: LoadSpec, opts: OverloadOptions, name: str
) -> tuple[list[Sent], float]:
    """Send ``requests`` on ``load``'s schedule, no retries: (what each saw, duration in s)."""
    sent: dict[int, Sent] = {}
    client = _RecordingClient(address)
    async with client:

        async def send(request: BenchRequest, origin: float) -> RequestOutcome:
            task = asyncio.current_task()
            started = time.perf_counter()
            outcome = await send_to_gateway(client, request, origin, timeout_s=opts.timeout_s)
            error = client.errors.pop(task, None)
            sent[id(request)] = Sent(
                outcome,
                request.output_len,
                client.streamed.pop(task, 0),
                None if error is None else error.code().name,
                None if error is None else retry_after_of(error),
                time.perf_counter() - started,
            )
            return outcome

        timing = await run_load(requests, load, send, desc=name, disable_progress=not opts.progress)
    return [sent[id(r)] for r in requests], timing.duration_s


def _ms(stats: LatencyStats) -> dict[str, float]:
    return {"p50_ms": stats.percentiles_ms[50.0], "p99_ms": stats.percentiles_ms[99.0]}


def summarize(results: Sequence[Sent], duration_s: float, load: LoadSpec) -> dict[str, Any]:
    """Admitted vs refused, refusal statuses and hints, and the admitted requests' figures."""
    admitted = [r for r in results if not r.refused]
    refused = [r for r in results if r.refused]
    metrics = compute_metrics([r.outcome for r in admitted], duration_s, None, PERCENTILES)
    hints = [r.retry_after_s for r in refused if r.retry_after_s is not None]
    return {
        "load": load.describe(),
        "offered": len(results),
        "offered_rate": len(results) / duration_s,
        "duration_s": duration_s,
        "admitted": len(admitted),
        "refused": len(refused),
        "complete": sum(r.complete for r in admitted),
        "refusal_codes": dict(Counter(r.code for r in refused)),
        "refusals_without_retry_info": sum(r.retry_after_s is None for r in refused),
        "retry_after_s": {"min": min(hints), "max": max(hints)} if hints else None,
        "refusal_round_trip": _ms(LatencyStats.of([r.seconds for r in refused], PERCENTILES)),
        "request_throughput": metrics.request_throughput,
        "output_throughput": metrics.output_throughput,
        "ttft": _ms(metrics.ttft),
        "e2e": _ms(metrics.e2el),
        "errors": sorted({r.outcome.error for r in admitted if not r.complete})[:10],
    }


def _findings(
    capacity: dict[str, Any], over: dict[str, Any], results: Sequence[Sent], opts: OverloadOptions
) -> list[str]:
    found = []
    if capacity["refused"]:
        found.append(f"{capacity['refused']} requests refused at 1x (closed loop at the limit)")
    for phase, summary in (("1x", capacity), ("overload", over)):
        if summary["complete"] != summary["admitted"]:
            found.append(
                f"{phase}: {summary['admitted'] - summary['complete']} admitted requests did not "
                f"stream all their tokens: {summary['errors']}"
            )
    wrong = {c: n for c, n in over["refusal_codes"].items() if c != "RESOURCE_EXHAUSTED"}
    if wrong:
        found.append(f"refusals with a status other than RESOURCE_EXHAUSTED: {wrong}")
    bad_hints = [r.retry_after_s for r in results if r.refused and not (r.retry_after_s or 0) > 0]
    if bad_hints:
        found.append(f"{len(bad_hints)} refusals without a RetryInfo hint > 0: {bad_hints[:5]}")
    if not over["refused"]:
        found.append(f"nothing refused at {opts.factor:g}x: the overload did not overload")
    for key in ("p50_ms", "p99_ms"):
        bound = opts.max_ttft_ratio * capacity["ttft"][key] + opts.ttft_slack_ms
        if over["ttft"][key] > bound:
            found.append(
                f"admitted TTFT {key[:3]} {over['ttft'][key]:.0f} ms at {opts.factor:g}x exceeds "
                f"{bound:.0f} ms ({opts.max_ttft_ratio:g} x the 1x {key[:3]} + "
                f"{opts.ttft_slack_ms:g} ms)"
            )
    return found


def pool_report(
    statuses: Sequence[worker_pb2.WorkerStatus], addresses: Sequence[str]
) -> list[dict[str, Any]]:
    """Each worker's pool and queues, and whether it is idle."""
    rows = []
    for address, s in zip(addresses, statuses, strict=True):
        row = {
            "address": address,
            "tier": s.tier,
            "free_blocks": s.free_blocks,
            "total_blocks": s.total_blocks,
            "running": s.running,
            "waiting": s.waiting,
            "pending_transfers": s.pending_transfers,
            "pool_ok": s.pool_ok,
        }
        row["idle"] = (
            s.free_blocks == s.total_blocks
            and s.running == s.waiting == s.pending_transfers == 0
            and s.pool_ok
        )
        rows.append(row)
    return rows


def run_overload(cluster: Cluster, vocab: Sequence[int], opts: OverloadOptions) -> dict[str, Any]:
    """Both phases against ``cluster`` (its gateway admitting ``opts.max_concurrent``): the
    report, findings included."""
    total = opts.requests + math.ceil(opts.factor * opts.requests)
    requests = random_requests(vocab, total, opts.input_len, opts.output_len, opts.seed)
    first, second = requests[: opts.requests], requests[opts.requests :]
    warm = [BenchRequest(r.prompt_token_ids[::-1], 4) for r in first[: opts.max_concurrent]]
    closed = LoadSpec(max_concurrency=opts.max_concurrent, seed=opts.seed)
    asyncio.run(run_phase(cluster.gateway, warm, closed, opts, "warm-up"))
    results, duration = asyncio.run(run_phase(cluster.gateway, first, closed, opts, "1x"))
    capacity = summarize(results, duration, closed)
    rate = opts.factor * capacity["request_throughput"]
    open_loop = LoadSpec(request_rate=rate, seed=opts.seed)
    over_results, over_duration = asyncio.run(
        run_phase(cluster.gateway, second, open_loop, opts, f"{opts.factor:g}x")
    )
    over = summarize(over_results, over_duration, open_loop)
    addresses = [*cluster.prefill, *cluster.decode]
    pools = pool_report(cluster.wait_idle(IDLE_TIMEOUT_S), addresses)
    found = _findings(capacity, over, over_results, opts)
    found += [f"pool not idle afterwards: {p}" for p in pools if not p["idle"]]
    return {
        "options": {
            **asdict(opts),
            "input_len": asdict(opts.input_len),
            "output_len": asdict(opts.output_len),
        },
        "capacity": capacity,
        "overload": over,
        "ttft_ratio": {
            key: over["ttft"][key] / max(capacity["ttft"][key], 1e-9)
            for key in ("p50_ms", "p99_ms")
        },
        "pools": pools,
        "findings": found,
    }


def print_report(report: dict[str, Any]) -> None:
    cap, over = report["capacity"], report["overload"]
    print(
        f"{'phase':<10}{'offered':>8}{'admitted':>9}{'refused':>8}{'req/s':>8}"
        f"{'TTFT p50':>10}{'TTFT p99':>10}{'E2E p99':>10}"
    )
    for name, s in (("1x", cap), (f"{report['options']['factor']:g}x", over)):
        print(
            f"{name:<10}{s['offered']:>8}{s['admitted']:>9}{s['refused']:>8}"
            f"{s['request_throughput']:>8.2f}{s['ttft']['p50_ms']:>8.0f}ms"
            f"{s['ttft']['p99_ms']:>8.0f}ms{s['e2e']['p99_ms']:>8.0f}ms"
        )
    print(
        f"offered {over['offered_rate']:.2f} req/s; refusals: {over['refusal_codes']}, "
        f"RetryInfo {over['retry_after_s']}, round trip p50 "
        f"{over['refusal_round_trip']['p50_ms']:.1f} ms / p99 "
        f"{over['refusal_round_trip']['p99_ms']:.1f} ms"
    )
    print(
        f"admitted TTFT, {report['options']['factor']:g}x / 1x: p50 "
        f"{report['ttft_ratio']['p50_ms']:.2f}, p99 {report['ttft_ratio']['p99_ms']:.2f}"
    )
    print(f"pools idle afterwards: {all(p['idle'] for p in report['pools'])}")
    for finding in report["findings"]:
        print(f"FINDING: {finding}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["disaggregated", "colocated"], default="disaggregated")
    parser.add_argument("--model", default=None, help="model folder (default: the default model)")
    parser.add_argument("--max-concurrent", type=int, default=8, help="the gateway's limit")
    parser.add_argument("--max-queued", type=int, default=0, help="the gateway's queue")
    parser.add_argument("--retry-after-ms", type=int, default=500)
    parser.add_argument("--factor", type=float, default=5.0, help="offered load / capacity")
    parser.add_argument("--requests", type=int, default=96, help="requests of the 1x phase")
    parser.add_argument("--input-len", type=LengthRange.parse, default=INPUT_LEN)
    parser.add_argument("--output-len", type=LengthRange.parse, default=OUTPUT_LEN)
    parser.add_argument("--max-ttft-ratio", type=float, default=3.0)
    parser.add_argument("--ttft-slack-ms", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    opts = OverloadOptions(
        max_concurrent=args.max_concurrent,
        factor=args.factor,
        requests=args.requests,
        input_len=args.input_len,
        output_len=args.output_len,
        seed=args.seed,
        max_ttft_ratio=args.max_ttft_ratio,
        ttft_slack_ms=args.ttft_slack_ms,
        progress=not args.quiet,
    )
    model = resolve_model_path(
        ModelConfig(model=args.model or DEFAULT_MODEL, cache_dir=default_cache_dir())
    )
    logs = Path(tempfile.mkdtemp(prefix="pdserve-overload-"))
    cluster = start_cluster(
        str(model),
        prefill=1 if args.mode == "disaggregated" else 0,
        decode=1,
        log_dir=logs,
        extra=gateway_flags(args.max_concurrent, args.max_queued, args.retry_after_ms),
    )
    try:
        report = run_overload(cluster, prompt_vocab(model), opts)
    finally:
        cluster.stop()
    report.update(
        mode=args.mode,
        model=str(model),
        max_queued=args.max_queued,
        retry_after_ms=args.retry_after_ms,
        logs=str(logs),
    )
    print_report(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if report["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
