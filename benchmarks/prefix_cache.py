"""TTFT on a prefix-cache hit vs a miss, with a long shared prefix, in one run.

    .venv/bin/python benchmarks/prefix_cache.py                  # 1,024-token prefix
    .venv/bin/python benchmarks/prefix_cache.py --prefix 2048

For each mode (disaggregated, colocated) it starts a cluster, then for ``--repeats`` fresh
prefixes sends one request with a new prefix (a miss: the whole prompt is computed) and one
sharing it with a different suffix (a hit: only the suffix is computed), one at a time, and
reports median TTFT of each and their ratio. Target (issue 4): hit TTFT <= 0.25x miss TTFT.
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


async def ttft(client: AsyncClient, prompt: list[int]) -> float:
    sent = time.perf_counter()
    async for chunk in client.generate(prompt_token_ids=prompt, max_tokens=2, temperature=0.0):
        if chunk.token_ids:
            return time.perf_counter() - sent
    raise RuntimeError("no token")


async def measure(
    gateway: str, prefix_len: int, suffix_len: int, repeats: int, seed: int
) -> dict[str, float]:
    rng = random.Random(seed)
    misses, hits = [], []
    async with AsyncClient(gateway) as client:
        await ttft(client, [5, 6, 7])  # warm up
        for _ in range(repeats):
            prefix = [rng.randrange(3, 49000) for _ in range(prefix_len)]
            suffixes = [[rng.randrange(3, 49000) for _ in range(suffix_len)] for _ in range(2)]
            misses.append(await ttft(client, prefix + suffixes[0]))
            hits.append(await ttft(client, prefix + suffixes[1]))
    miss, hit = statistics.median(misses), statistics.median(hits)
    return {"miss_ttft_s": miss, "hit_ttft_s": hit, "ratio": hit / miss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", type=int, default=1024)
    parser.add_argument("--suffix", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model = args.model or str(resolve_model_path(ModelConfig(cache_dir=default_cache_dir())))
    results = {}
    with tempfile.TemporaryDirectory() as logs:
        for mode, prefill in (("disaggregated", 1), ("colocated", 0)):
            cluster = start_cluster(model, prefill=prefill, decode=1, log_dir=Path(logs))
            try:
                results[mode] = asyncio.run(
                    measure(cluster.gateway, args.prefix, args.suffix, args.repeats, args.seed)
                )
            finally:
                cluster.stop()
    print(
        f"{args.prefix}-token shared prefix + {args.suffix}-token suffix, "
        f"median of {args.repeats}, one request at a time"
    )
    print(f"{'mode':<15}{'miss TTFT':>11}{'hit TTFT':>10}{'hit/miss':>10}")
    for mode, r in results.items():
        verdict = "PASS" if r["ratio"] <= 0.25 else "MISS"
        print(
            f"{mode:<15}{r['miss_ttft_s']:>10.2f}s{r['hit_ttft_s']:>9.2f}s"
            f"{r['ratio']:>9.2f}x  {verdict} (target <= 0.25x)"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
