"""Inter-token latency of running streams while long prompts arrive: disaggregated vs colocated.

    .venv/bin/python benchmarks/interference.py            # default model, ~5 minutes
    .venv/bin/python benchmarks/interference.py --quick    # fewer tokens and prompts

Why disaggregation exists: in a colocated engine a long prefill entering the batch stalls every
running stream for the length of that prefill. For each mode the script starts a cluster with
every worker on a core of its own (``pdserve up --pin-cpus``), starts ``--streams`` long greedy
streams and files their inter-token gaps under alternating ``--gap``-second windows: quiet ones
with no other load, and loaded ones that each begin with a ``--long-prompt``-token prompt. The
streams' contexts grow all run long, and attention grows with them; alternating windows give both
phases the same context lengths (a quiet phase first and a loaded one after would charge the
growth to the prompts). Prints p50/p99 ITL of both phases and their ratio. Target (issue 4):
disaggregated loaded p99 <= 1.3x quiet p99. ``--kv-backend stream`` for the direct-socket
backend.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from engine.config import ModelConfig
from engine.model_files import default_cache_dir, resolve_model_path
from pdserve.client import AsyncClient
from pdserve.local_cluster import start_cluster


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Windows:
    """Quiet and loaded windows of ``length`` seconds, alternating from ``start`` (quiet first)
    until ``end``: both phases see the same spread of context lengths as the streams grow."""

    def __init__(self, start: float, length: float, end: float) -> None:
        self.start, self.length, self.end = start, length, end

    def phase(self, t: float) -> str:
        return "loaded" if int((t - self.start) / self.length) % 2 else "quiet"

    def loaded_starts(self) -> list[float]:
        count = int((self.end - self.start) / self.length)
        return [self.start + k * self.length for k in range(1, count, 2)]


async def stream_gaps(
    client: AsyncClient,
    prompt: list[int],
    tokens: int,
    windows: Windows,
    gaps: dict[str, list[float]],
) -> None:
    """One long stream; each gap is filed under the phase of the window it ended in."""
    last = None
    async for chunk in client.generate(
        prompt_token_ids=prompt, max_tokens=tokens, temperature=0.0, ignore_eos=True
    ):
        now = time.monotonic()
        if last is not None and chunk.token_ids and windows.start <= now < windows.end:
            gap = (now - last) / len(chunk.token_ids)
            gaps[windows.phase(now)].extend([gap] * len(chunk.token_ids))
        last = now


async def long_prompts(
    client: AsyncClient, rng: random.Random, length: int, windows: Windows
) -> int:
    """One long prompt at the start of every loaded window."""
    pending = []
    for at in windows.loaded_starts():
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        prompt = [rng.randrange(3, 49000) for _ in range(length)]

        async def one(p: list[int] = prompt) -> None:
            async for _ in client.generate(
                prompt_token_ids=p, max_tokens=4, temperature=0.0, ignore_eos=True
            ):
                pass

        pending.append(asyncio.ensure_future(one()))
    await asyncio.gather(*pending)
    return len(pending)


async def measure(gateway: str, args: argparse.Namespace) -> dict[str, float]:
    rng = random.Random(args.seed)
    async with AsyncClient(gateway) as client:
        async for _ in client.generate(prompt="warm up", max_tokens=4):
            pass
        start = time.monotonic() + 2.0  # the streams' own prompts are in by then
        windows = Windows(start, args.gap, start + 2 * args.phase_s)
        gaps: dict[str, list[float]] = {"quiet": [], "loaded": []}
        streams = [
            stream_gaps(client, [rng.randrange(3, 49000) for _ in range(32)], 6000, windows, gaps)
            for _ in range(args.streams)
        ]
        tasks = [asyncio.ensure_future(s) for s in streams]
        sent = await long_prompts(client, rng, args.long_prompt, windows)
        await asyncio.sleep(max(0.0, windows.end - time.monotonic()))
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise RuntimeError("a running stream failed") from task.exception()
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    result = {"long_prompts_sent": float(sent)}
    for phase, values in gaps.items():
        result[f"{phase}_itl_p50_ms"] = 1000 * statistics.median(values)
        result[f"{phase}_itl_p99_ms"] = 1000 * percentile(values, 99)
        result[f"{phase}_gaps"] = float(len(values))
    result["p99_ratio"] = result["loaded_itl_p99_ms"] / result["quiet_itl_p99_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--long-prompt", type=int, default=2048)
    parser.add_argument(
        "--gap", type=float, default=6.0, help="seconds per window (a long prompt per loaded one)"
    )
    parser.add_argument(
        "--phase-s", type=float, default=40.0, help="seconds of each phase (windows alternate)"
    )
    parser.add_argument("--max-batched-tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--kv-backend", default="zmq", help="KV transfer backend of the disaggregated cluster"
    )
    parser.add_argument(
        "--modes",
        default="disaggregated,colocated",
        help="which of disaggregated,colocated to run",
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.phase_s, args.long_prompt, args.gap = 16.0, 1024, 4.0
    model = args.model or str(resolve_model_path(ModelConfig(cache_dir=default_cache_dir())))
    results = {}
    with tempfile.TemporaryDirectory() as logs:
        modes = [m for m in (("disaggregated", 1), ("colocated", 0)) if m[0] in args.modes]
        for mode, prefill in modes:
            extra = (
                "--pin-cpus",
                "--threads",
                "1",
                "--max-batched-tokens",
                str(args.max_batched_tokens),
                "--kv-backend",
                args.kv_backend,
            )
            cluster = start_cluster(
                model, prefill=prefill, decode=1, log_dir=Path(logs), extra=extra
            )
            try:
                results[mode] = asyncio.run(measure(cluster.gateway, args))
            finally:
                cluster.stop()
    print(
        f"{args.streams} running streams; quiet and loaded {args.gap:.0f}s windows alternate "
        f"({args.phase_s:.0f}s of each), a {args.long_prompt}-token prompt at the start of each "
        f"loaded one; one core per worker"
    )
    print(
        f"{'mode':<15}{'quiet p50':>10}{'quiet p99':>10}{'loaded p50':>11}{'loaded p99':>11}"
        f"{'p99 ratio':>10}"
    )
    for mode, r in results.items():
        print(
            f"{mode:<15}{r['quiet_itl_p50_ms']:>8.0f}ms{r['quiet_itl_p99_ms']:>8.0f}ms"
            f"{r['loaded_itl_p50_ms']:>9.0f}ms{r['loaded_itl_p99_ms']:>9.0f}ms"
            f"{r['p99_ratio']:>9.2f}x"
        )
    if "disaggregated" in results:
        verdict = "PASS" if results["disaggregated"]["p99_ratio"] <= 1.3 else "MISS"
        print(f"target: disaggregated loaded/quiet p99 <= 1.3x: {verdict}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
