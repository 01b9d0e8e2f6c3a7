"""TTFT and output tokens/s for N concurrent requests, disaggregated vs colocated, in one run.

    .venv/bin/python benchmarks/concurrent_generate.py --requests 8 --max-tokens 64

Starts each cluster with ``pdserve up`` on loopback, warms it up, sends N requests at once
(greedy, ``ignore_eos`` so every request produces exactly ``--max-tokens`` tokens) and reports
per-request TTFT (first streamed token - request sent) and aggregate output tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from engine.config import ModelConfig
from engine.model_files import default_cache_dir, resolve_model_path
from pdserve.client import AsyncClient
from pdserve.local_cluster import start_cluster

WORDS = (
    *("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"),
    *("while", "seven", "bright", "stars", "slowly", "fade"),
)


def make_prompts(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(48, 200))) for _ in range(n)]


async def one(client: AsyncClient, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    sent = time.perf_counter()
    first = None
    tokens = 0
    async for chunk in client.generate(
        prompt=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True
    ):
        if chunk.token_ids and first is None:
            first = time.perf_counter()
        tokens += len(chunk.token_ids)
    assert first is not None
    return first - sent, time.perf_counter() - sent, tokens


async def run_load(gateway: str, prompts: list[str], max_tokens: int) -> dict[str, float]:
    async with AsyncClient(gateway) as client:
        await one(client, "warm up", 4)
        start = time.perf_counter()
        results = await asyncio.gather(*[one(client, p, max_tokens) for p in prompts])
        wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    total_tokens = sum(r[2] for r in results)
    return {
        "ttft_mean_s": statistics.mean(ttfts),
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_max_s": ttfts[-1],
        "e2e_max_s": max(r[1] for r in results),
        "output_tokens": total_tokens,
        "output_tok_per_s": total_tokens / wall,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()
    model = args.model or str(resolve_model_path(ModelConfig(cache_dir=default_cache_dir())))
    prompts = make_prompts(args.requests, args.seed)
    results = {}
    with tempfile.TemporaryDirectory() as logs:
        for mode, prefill in (("disaggregated", 1), ("colocated", 0)):
            cluster = start_cluster(model, prefill=prefill, decode=1, log_dir=Path(logs))
            try:
                results[mode] = asyncio.run(run_load(cluster.gateway, prompts, args.max_tokens))
            finally:
                cluster.stop()
    print(
        f"{args.requests} concurrent requests, {args.max_tokens} output tokens each, "
        f"prompts 48-200 words, 1 thread per worker"
    )
    print(f"{'mode':<15}{'TTFT mean':>11}{'TTFT p50':>10}{'TTFT max':>10}{'tok/s':>8}{'wall':>8}")
    for mode, r in results.items():
        print(
            f"{mode:<15}{r['ttft_mean_s']:>10.2f}s{r['ttft_p50_s']:>9.2f}s"
            f"{r['ttft_max_s']:>9.2f}s{r['output_tok_per_s']:>8.1f}{r['wall_s']:>7.1f}s"
        )
    ratio = results["disaggregated"]["output_tok_per_s"] / results["colocated"]["output_tok_per_s"]
    print(f"disaggregated / colocated output tok/s: {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
