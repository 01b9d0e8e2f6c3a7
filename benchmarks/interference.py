"""Inter-token latency of running streams while long prompts arrive: disaggregated vs colocated.

    .venv/bin/python benchmarks/interference.py            # default model, ~5 minutes
    .venv/bin/python benchmarks/interference.py --quick    # fewer tokens and prompts

Why disaggregation exists: in a colocated engine a long prefill entering the batch stalls every
running stream for the length of that prefill. For each mode the script starts a cluster with
every worker on a core of its own (``pdserve up --pin-cpus``), starts ``--streams`` long greedy
streams, measures their inter-token gaps with no other load (quiet), then again while
``--long-prompt``-token prompts arrive every ``--gap`` seconds (loaded), and prints p50/p99 ITL
of both phases and their ratio. Target (issue 4): disaggregated loaded p99 <= 1.3x quiet p99.
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
from engine.model_loader import default_cache_dir, resolve_model_path
from pdserve.client import AsyncClient
from pdserve.local_cluster import start_cluster


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def stream_gaps(
    client: AsyncClient,
    prompt: list[int],
    tokens: int,
    window: dict[str, float],
    gaps: dict[str, list[float]],
) -> None:
    """One long stream; each gap is filed under the phase current when it ended."""
    last = None
    async for chunk in client.generate(
        prompt_token_ids=prompt, max_tokens=tokens, temperature=0.0, ignore_eos=True
    ):
        now = time.monotonic()
        if last is not None and chunk.token_ids:
            phase = "quiet" if now < window["loaded_from"] else "loaded"
            if now < window["end"]:
                gaps[phase].extend([(now - last) / len(chunk.token_ids)] * len(chunk.token_ids))
        last = now


async def long_prompts(
    client: AsyncClient, rng: random.Random, length: int, gap: float, window: dict[str, float]
) -> int:
    sent = 0
    await asyncio.sleep(max(0.0, window["loaded_from"] - time.monotonic()))
    pending = []
    while time.monotonic() < window["end"] - gap:
        prompt = [rng.randrange(3, 49000) for _ in range(length)]

        async def one(p: list[int] = prompt) -> None:
            async for _ in client.generate(
                prompt_token_ids=p, max_tokens=4, temperature=0.0, ignore_eos=True
            ):
                pass

        pending.append(asyncio.ensure_future(one()))
        sent += 1
        await asyncio.sleep(gap)
    await asyncio.gather(*pending)
    return sent


async def measure(gateway: str, args: argparse.Namespace) -> dict[str, float]:
    rng = random.Random(args.seed)
    async with AsyncClient(gateway) as client:
        async for _ in client.generate(prompt="warm up", max_tokens=4):
            pass
        start = time.monotonic()
        window = {"loaded_from": start + args.phase_s, "end": start + 2 * args.phase_s}
        gaps: dict[str, list[float]] = {"quiet": [], "loaded": []}
        streams = [
            stream_gaps(client, [rng.randrange(3, 49000) for _ in range(32)], 6000, window, gaps)
            for _ in range(args.streams)
        ]
        tasks = [asyncio.ensure_future(s) for s in streams]
        sent = await long_prompts(client, rng, args.long_prompt, args.gap, window)
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
    parser.add_argument("--gap", type=float, default=6.0, help="seconds between long prompts")
    parser.add_argument("--phase-s", type=float, default=40.0, help="seconds per phase")
    parser.add_argument("--max-batched-tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.phase_s, args.long_prompt, args.gap = 15.0, 1024, 4.0
    model = args.model or str(resolve_model_path(ModelConfig(cache_dir=default_cache_dir())))
    results = {}
    with tempfile.TemporaryDirectory() as logs:
        for mode, prefill in (("disaggregated", 1), ("colocated", 0)):
            extra = (
                "--pin-cpus",
                "--threads",
                "1",
                "--max-batched-tokens",
                str(args.max_batched_tokens),
            )
            cluster = start_cluster(
                model, prefill=prefill, decode=1, log_dir=Path(logs), extra=extra
            )
            try:
                results[mode] = asyncio.run(measure(cluster.gateway, args))
            finally:
                cluster.stop()
    print(
        f"{args.streams} running streams; {args.long_prompt}-token prompts every {args.gap}s "
        f"in the loaded phase; {args.phase_s:.0f}s per phase; one core per worker"
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
    verdict = "PASS" if results["disaggregated"]["p99_ratio"] <= 1.3 else "MISS"
    print(f"target: disaggregated loaded/quiet p99 <= 1.3x: {verdict}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
