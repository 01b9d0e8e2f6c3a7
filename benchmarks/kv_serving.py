"""Section 3 of ``benchmarks/kv_transfer.py``: TTFT and time to the second token, disaggregated
(layer-wise and send-after-prefill) vs colocated, through real clusters (``pdserve up``).

All clusters are started first and kept up, then requests go one at a time, round-robin over
the clusters for every size and repeat, so that drifting background load on a shared machine
hits every mode alike. Prompts are random token ids in [3, 49000). Each request is greedy with
``ignore_eos`` and ``max_tokens=2``; TTFT is the first streamed token minus the request sent,
time-to-second-token the second one's.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kv_common import summarize

# name -> (prefill workers, extra `pdserve up` flags)
MODES: dict[str, tuple[int, tuple[str, ...]]] = {
    "colocated": (0, ()),
    "disaggregated": (1, ()),  # the default: layer-wise streaming, fleet key, tcp
    "disagg-after-prefill": (1, ("--kv-streaming", "after-prefill")),
}
POOL_BLOCKS = "512"  # enough for one 2048-token request at a time; keeps idle clusters small
REQUEST_TIMEOUT_S = 180.0


async def _one(client: Any, prompt: list[int]) -> tuple[float, float]:
    start = time.monotonic()
    stamps: list[float] = []
    async for chunk in client.generate(
        prompt_token_ids=prompt,
        max_tokens=2,
        temperature=0.0,
        ignore_eos=True,
        timeout=REQUEST_TIMEOUT_S,
    ):
        now = time.monotonic()
        stamps.extend(now for _ in chunk.token_ids)
    if len(stamps) < 2:
        raise RuntimeError(f"expected 2 tokens, got {len(stamps)}")
    return stamps[0] - start, stamps[1] - start


async def _measure(
    clusters: dict[str, Any],
    sizes: list[int],
    reps: int,
    seed: int,
    vocab_top: int,
    progress: Callable[[str], None],
) -> dict[str, dict[int, list[tuple[float, float]]]]:
    from pdserve.client import AsyncClient

    rng = random.Random(seed)
    clients = {mode: AsyncClient(c.gateway) for mode, c in clusters.items()}
    samples: dict[str, dict[int, list[tuple[float, float]]]] = {
        mode: {t: [] for t in sizes} for mode in clusters
    }
    try:
        for mode, client in clients.items():  # warm-up: channels, handshakes, first forwards
            for _ in range(2):
                await _one(client, [rng.randrange(3, vocab_top) for _ in range(min(sizes))])
            clusters[mode].wait_idle(15)
        for rep in range(reps):
            progress(f"repeat {rep + 1}/{reps}")
            for tokens in sizes:
                for mode, client in clients.items():
                    prompt = [rng.randrange(3, vocab_top) for _ in range(tokens)]
                    samples[mode][tokens].append(await _one(client, prompt))
                    clusters[mode].wait_idle(15)  # one request at a time, blocks all freed
    finally:
        for client in clients.values():
            await client.close()
    return samples


def run(
    model_path: str,
    sizes: list[int],
    reps: int,
    seed: int,
    log_dir: Path,
    modes: list[str] | None = None,
    vocab_top: int = 49000,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    from pdserve.local_cluster import Cluster, start_cluster

    modes = list(MODES) if modes is None else modes
    clusters: dict[str, Cluster] = {}

    def start(mode: str) -> None:
        prefill, extra = MODES[mode]
        clusters[mode] = start_cluster(
            model_path,
            prefill=prefill,
            decode=1,
            log_dir=log_dir,
            extra=(*extra, "--num-blocks", POOL_BLOCKS),
        )

    try:
        progress(f"starting {len(modes)} clusters ({', '.join(modes)})")
        with ThreadPoolExecutor(len(modes)) as pool:  # start-up is mostly waiting: overlap it
            for future in [pool.submit(start, mode) for mode in modes]:
                future.result()
        ordered = {mode: clusters[mode] for mode in modes}
        samples = asyncio.run(_measure(ordered, sizes, reps, seed, vocab_top, progress))
    finally:
        for cluster in clusters.values():
            cluster.stop()
    rows: list[dict[str, Any]] = []
    for mode, by_size in samples.items():
        for tokens, runs in by_size.items():
            rows.append(
                {
                    "mode": mode,
                    "tokens": tokens,
                    "ttft_s": summarize([r[0] for r in runs]),
                    "t2t_s": summarize([r[1] for r in runs]),
                    "second_gap_s": summarize([r[1] - r[0] for r in runs]),
                    "runs": [{"ttft_s": r[0], "t2t_s": r[1]} for r in runs],
                }
            )
    by = {(r["mode"], r["tokens"]): r for r in rows}
    ratios: dict[str, dict[str, float]] = {}
    for mode in modes:
        if mode == "colocated":
            continue
        ratios[mode] = {}
        for tokens in sizes:
            ours, theirs = by[(mode, tokens)], by[("colocated", tokens)]
            ratios[mode][f"ttft_{tokens}"] = ours["ttft_s"]["median"] / theirs["ttft_s"]["median"]
            ratios[mode][f"t2t_{tokens}"] = ours["t2t_s"]["median"] / theirs["t2t_s"]["median"]
    return {
        "rows": rows,
        "ratios_to_colocated": ratios,
        "modes": {m: {"prefill": MODES[m][0], "extra": list(MODES[m][1])} for m in modes},
        "max_tokens": 2,
        "threads_per_worker": 1,
        "num_blocks": int(POOL_BLOCKS),
    }
