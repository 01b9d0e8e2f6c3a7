"""Decode-step micro-benchmark: the real model runner on the default model, no server.

    .venv/bin/python benchmarks/decode_step.py                       # B in 1,8,16,32; C in 128,512
    .venv/bin/python benchmarks/decode_step.py --batch 16 --context 200 --profile

For every (B, C) it gives B sequences a C-token context already in the KV cache (random K and V
in shuffled blocks, as a long-running pool scatters them), then times the same decode step (one
new token per sequence) ``--steps`` times and reports the median step (wall time, and the
process's CPU time, which moves less on a shared machine), output tokens/s, and where the step's
time goes, as mean ms per step: ``prepare`` (batch -> tensors), ``attention`` (the paged
attention function, all layers), ``model`` (the rest of the forward pass: linear layers, norms,
RoPE, logits) and ``sample``. ``--profile`` also prints torch.profiler's top operators.
``--prompt-len 1024`` adds a new 1,024-token prompt to every step: what decoding streams' ITL
costs while a long prompt arrives (colocated serving). ``--attention`` and ``--linear`` pick the
paths timed side by side (torch's or the native kernels, every combination); ``--weights float
gguf int8`` adds what the native linear layers compute from (float32, the default model's GGUF
blocks, int8 groups: :mod:`engine.quantized_weights`).
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

from core.sampling import SamplingParams
from engine import attention, llama_forward
from engine.attention import register_paged_attention
from engine.config import DType, ModelConfig, WeightsChoice
from engine.kernels import load_layer_ops, load_linear, load_paged_attention
from engine.kernels.quant_linear import load_quant_linear
from engine.kv_cache import KVCache
from engine.model_files import default_cache_dir
from engine.model_loader import load_model
from engine.model_runner import ModelRunner
from engine.quantized_weights import FLOAT_PLAN, plan_weights
from engine.sampler import Sampler
from engine.scheduler import ScheduledBatch, ScheduledSeq
from engine.sequence import Sequence

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
    attend = attention.attend

    def timed_prepare(batch: ScheduledBatch) -> Any:
        with timers.part("prepare"):
            return prepare(batch)

    def timed_sample(*args: Any, **kwargs: Any) -> Any:
        with timers.part("sample"):
            return sample(*args, **kwargs)

    def timed_attention(*args: Any, **kwargs: Any) -> Any:
        with timers.part("attention"):
            return paged(*args, **kwargs)

    def timed_attend(*args: Any, **kwargs: Any) -> Any:
        with timers.part("attention"):
            return attend(*args, **kwargs)

    runner.prepare = timed_prepare  # type: ignore[method-assign]
    runner.sampler.sample = timed_sample  # type: ignore[method-assign]
    AttentionInterface.register(attention.ATTENTION_NAME, timed_attention)  # transformers path
    llama_forward.attend = timed_attend  # type: ignore[assignment]  # pdserve's forward pass


def decode_batch(
    num_seqs: int, context: int, cache: KVCache, seed: int, prompt_len: int = 0
) -> ScheduledBatch:
    """B sequences whose first ``context`` tokens are computed, each about to decode one more;
    with ``prompt_len``, also a new prompt of that many tokens computed whole in the same step."""
    blocks_each = -(-(context + 1) // BLOCK_SIZE)
    order = torch.randperm(cache.num_blocks, generator=torch.Generator().manual_seed(seed))
    greedy = SamplingParams(max_tokens=10**6, temperature=0)
    items = []
    for i in range(num_seqs):
        tokens = [(i * 7919 + p) % 40000 + 3 for p in range(context + 1)]
        seq = Sequence(f"s{i}", tokens, context, greedy)
        seq.block_table = order[i * blocks_each : (i + 1) * blocks_each].tolist()
        seq.num_computed_tokens = context
        items.append(ScheduledSeq(seq, 1, True))
    if prompt_len:
        prompt = Sequence("prompt", [(p * 31) % 40000 + 3 for p in range(prompt_len)], 0, greedy)
        first = num_seqs * blocks_each
        prompt.block_table = order[first : first + -(-prompt_len // BLOCK_SIZE)].tolist()
        items.append(ScheduledSeq(prompt, prompt_len, True))
    return ScheduledBatch(tuple(items))


def measure(
    runner: ModelRunner, timers: Timers, batch: ScheduledBatch, steps: int, warmup: int
) -> dict[str, float]:
    for _ in range(warmup):
        runner.execute(batch)
    timers.reset()
    times, cpu_times = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        with timers.part("step"):
            runner.execute(batch)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    parts = {name: 1000 * total / steps for name, total in timers.total.items()}
    step_ms = 1000 * statistics.median(times)
    num_seqs = sum(1 for item in batch.items if item.num_new_tokens == 1)  # decoding sequences
    return {
        "batch": num_seqs,
        "context": batch.items[0].seq.num_computed_tokens,
        "step_ms": step_ms,
        "cpu_ms": 1000 * statistics.median(cpu_times),
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
    parser.add_argument(
        "--prompt-len",
        type=int,
        default=0,
        help="also compute a new prompt of this many tokens in every step (a long prompt "
        "arriving while B sequences decode)",
    )
    parser.add_argument("--model", default=ModelConfig().model)
    parser.add_argument("--dtype", choices=[d.value for d in DType], default="float32")
    parser.add_argument(
        "--attention",
        nargs="+",
        choices=["torch", "native"],
        default=["torch", "native"],
        help="decode attention paths to time side by side (engine.kernels for native)",
    )
    parser.add_argument(
        "--linear",
        nargs="+",
        choices=["torch", "native"],
        default=["native"],
        help="paths for the rest of each layer, side by side: native (the linear kernel and the "
        "layer operations of engine.kernels), torch (oneDNN and torch's operators); each "
        "attention path runs with each",
    )
    parser.add_argument(
        "--weights",
        nargs="+",
        choices=["float", "gguf", "int8"],
        default=["float"],
        help="what the native linear layers compute from, side by side (with --linear native)",
    )
    parser.add_argument("--profile", action="store_true", help="torch.profiler table per shape")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, spec = load_model(ModelConfig(model=args.model, dtype=DType(args.dtype), device="cpu"))
    model.set_attn_implementation(register_paged_attention())  # type: ignore[operator]
    weights = next(model.parameters())
    longest = max(args.context) + 1
    num_blocks = max(args.batch) * -(-longest // BLOCK_SIZE) + -(-args.prompt_len // BLOCK_SIZE)
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
    kernel = load_paged_attention(default_cache_dir()) if "native" in args.attention else None
    linear = load_linear(default_cache_dir()) if "native" in args.linear else None
    ops = load_layer_ops(default_cache_dir()) if "native" in args.linear else None
    quant = load_quant_linear(default_cache_dir()) if set(args.weights) - {"float"} else None
    plans = {
        w: FLOAT_PLAN if w == "float" else plan_weights(WeightsChoice(w), args.model, model, True)
        for w in args.weights
    }
    runners = {
        f"{attn}/{lin}" + ("" if w == "float" else f"/{w}"): ModelRunner(
            model,
            cache,
            Sampler(seed=0),
            kernel if attn == "native" else None,
            linear if lin == "native" else None,
            ops if lin == "native" else None,
            weights=plans[w],
            quant=quant,
        )
        for attn, lin, w in itertools.product(args.attention, args.linear, args.weights)
        if lin == "native" or w == "float"
    }
    timers = Timers()
    for runner in runners.values():
        instrument(runner, timers)

    rows = []
    header = f"{'attn/linear':>18} {'B':>3} {'C':>5} {'step ms':>8} {'cpu ms':>7} {'tok/s':>7}"
    header += f" {'prepare':>8} {'attn':>7}"
    header += f" {'model':>7} {'sample':>7}"
    print(
        f"threads={args.threads} dtype={args.dtype} steps={args.steps} "
        f"prompt_len={args.prompt_len} (ms per step)"
    )
    print(header)
    for context, num_seqs in itertools.product(args.context, args.batch):
        batch = decode_batch(num_seqs, context, cache, seed=context, prompt_len=args.prompt_len)
        for name, runner in runners.items():
            row = {"path": name, **measure(runner, timers, batch, args.steps, args.warmup)}
            rows.append(row)
            print(
                f"{name:>18} {num_seqs:>3} {context:>5} {row['step_ms']:>8.1f}"
                f" {row['cpu_ms']:>7.1f} {row['tok_s']:>7.1f}"
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
