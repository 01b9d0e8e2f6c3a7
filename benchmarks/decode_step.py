"""Decode-step micro-benchmark: the real model runner on the default model, no server.

    .venv/bin/python benchmarks/decode_step.py                       # B in 1,8,16,32; C in 128,512
    .venv/bin/python benchmarks/decode_step.py --batch 16 --context 200 --profile

For every (B, C) it gives B sequences a C-token context already in the KV cache (random K and V
in shuffled blocks, as a long-running pool scatters them), then times the same decode step (one
new token per sequence) ``--steps`` times and reports the median step, output tokens/s, and where
the step's time goes: ``prepare`` (batch -> tensors), ``attention`` (the paged attention
function, all layers), ``model`` (the rest of the forward pass: linear layers, norms, RoPE,
logits) and ``sample``. ``--profile`` also prints torch.profiler's top operators for one shape.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AttentionInterface

from engine import attention
from engine.attention import register_paged_attention
from engine.config import DType, ModelConfig
from engine.kv_cache import KVCache
from engine.model_loader import load_model
from engine.model_runner import ModelRunner
from engine.sampler import Sampler
from engine.scheduler import ScheduledBatch, ScheduledSeq
from engine.sequence import SamplingParams, Sequence

BLOCK_SIZE = 16


class Timers:
    """Seconds spent in each part of the step, summed over the timed steps."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - start

    def reset(self) -> None:
        self.total.clear()


def instrument(runner: ModelRunner, timers: Timers) -> None:
    """Wrap the runner's prepare and sampler, and the registered attention function, in timers."""
    prepare = runner.prepare
    sample = runner.sampler.sample
    paged = attention.paged_attention

    def timed_prepare(batch: ScheduledBatch) -> Any:
        with timers.part("prepare"):
            return prepare(batch)

    def timed_sample(*args: Any, **kwargs: Any) -> Any:
        with timers.part("sample"):
            return sample(*args, **kwargs)

    def timed_attention(*args: Any, **kwargs: Any) -> Any:
        with timers.part("attention"):
            return paged(*args, **kwargs)

    runner.prepare = timed_prepare  # type: ignore[method-assign]
    runner.sampler.sample = timed_sample  # type: ignore[method-assign]
    AttentionInterface.register(attention.ATTENTION_NAME, timed_attention)


def decode_batch(num_seqs: int, context: int, cache: KVCache, seed: int) -> ScheduledBatch:
    """B sequences whose first ``context`` tokens are computed, each about to decode one more."""
    blocks_each = -(-(context + 1) // BLOCK_SIZE)
    order = torch.randperm(cache.num_blocks, generator=torch.Generator().manual_seed(seed))
    items = []
    for i in range(num_seqs):
        tokens = [(i * 7919 + p) % 40000 + 3 for p in range(context + 1)]
        seq = Sequence(f"s{i}", tokens, context, SamplingParams(max_tokens=10**6, temperature=0))
        seq.block_table = order[i * blocks_each : (i + 1) * blocks_each].tolist()
        seq.num_computed_tokens = context
        items.append(ScheduledSeq(seq, 1, True))
    return ScheduledBatch(tuple(items))


def measure(
    runner: ModelRunner, timers: Timers, batch: ScheduledBatch, steps: int, warmup: int
) -> dict[str, float]:
    for _ in range(warmup):
        runner.execute(batch)
    timers.reset()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with timers.part("step"):
            runner.execute(batch)
        times.append(time.perf_counter() - start)
    parts = {name: 1000 * total / steps for name, total in timers.total.items()}
    step_ms = 1000 * statistics.median(times)
    num_seqs = len(batch.items)
    return {
        "batch": num_seqs,
        "context": batch.items[0].seq.num_computed_tokens,
        "step_ms": step_ms,
        "tok_s": num_seqs / (step_ms / 1000),
        "prepare_ms": parts.get("prepare", 0.0),
        "attention_ms": parts.get("attention", 0.0),
        "sample_ms": parts.get("sample", 0.0),
        "model_ms": parts["step"]
        - parts.get("prepare", 0.0)
        - parts.get("attention", 0.0)
        - parts.get("sample", 0.0),
    }


def profile(runner: ModelRunner, batch: ScheduledBatch, steps: int) -> None:
    runner.execute(batch)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.execute(batch)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--context", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=ModelConfig().model)
    parser.add_argument("--dtype", choices=[d.value for d in DType], default="float32")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table per shape")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, spec = load_model(ModelConfig(model=args.model, dtype=DType(args.dtype), device="cpu"))
    model.set_attn_implementation(register_paged_attention())  # type: ignore[operator]
    weights = next(model.parameters())
    longest = max(args.context) + 1
    num_blocks = max(args.batch) * -(-longest // BLOCK_SIZE) + 1
    cache = KVCache(
        spec.num_layers,
        num_blocks,
        BLOCK_SIZE,
        spec.num_kv_heads,
        spec.head_dim,
        weights.dtype,
        weights.device,
    )
    cache.kv.normal_(generator=torch.Generator().manual_seed(0))
    runner = ModelRunner(model, cache, Sampler(seed=0))
    timers = Timers()
    instrument(runner, timers)

    rows = []
    header = f"{'B':>3} {'C':>5} {'step ms':>8} {'tok/s':>7} {'prepare':>8} {'attn':>7}"
    header += f" {'model':>7} {'sample':>7}"
    print(f"threads={args.threads} dtype={args.dtype} steps={args.steps} (ms per step)")
    print(header)
    for context, num_seqs in itertools.product(args.context, args.batch):
        batch = decode_batch(num_seqs, context, cache, seed=context)
        row = measure(runner, timers, batch, args.steps, args.warmup)
        rows.append(row)
        print(
            f"{num_seqs:>3} {context:>5} {row['step_ms']:>8.1f} {row['tok_s']:>7.1f}"
            f" {row['prepare_ms']:>8.2f} {row['attention_ms']:>7.1f} {row['model_ms']:>7.1f}"
            f" {row['sample_ms']:>7.2f}",
            flush=True,
        )
        if args.profile:
            profile(runner, batch, min(args.steps, 3))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
