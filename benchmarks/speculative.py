"""Speculative decoding off vs n-gram prompt lookup vs a draft model, side by side, in one run.

    .venv/bin/python benchmarks/speculative.py --json /tmp/spec.json
    .venv/bin/python benchmarks/speculative.py --systems off,draft --draft-layers 12
    .venv/bin/python benchmarks/speculative.py --systems off,draft --draft-model ~/models/small
    .venv/bin/python benchmarks/speculative.py --mode disaggregated --num-speculative-tokens 4
    .venv/bin/python benchmarks/speculative.py --cluster-arg=--speculative-max-seqs=16
    .venv/bin/python benchmarks/speculative.py --quick --systems off   # smoke: 2 prompts, 32 tokens

Each system (``--speculative off``, ``ngram``, ``draft --draft-model DIR``) gets its own
``pdserve up`` on loopback (colocated, ``--prefill 0``, unless ``--mode disaggregated``) with
``/metrics`` on. ``draft`` uses ``--draft-model DIR`` where given; otherwise no smaller model with
the target's tokenizer is at hand offline, so the script builds a self-speculative draft
(LayerSkip-style early exit): the target's first ``--draft-layers`` decoder layers with its
final norm and (tied) lm_head, saved as a transformers folder in a temporary directory. The
default of 4 layers was the fastest of 4, 8 and 12 measured in-process at batch 1, and none of
them is fast: a model not trained for early exit agrees with its own greedy token after 4 to 12
layers only 5-9% of the time (about 50% after 26 of 30), and the draft computes in float32 (the
engine runs GGUF blocks for the default model only), so even its float32 lm_head reads more bytes
per token (113 MB) than the whole Q4_1 target (98 MB). Two workloads, built here from a seeded
RNG: *grounded* (repeat a text, or rewrite a function with a variable renamed: the answer copies
the prompt, where prompt lookup finds drafts) and *ungrounded* (write a story: little to copy).
Prompts go as user chat messages (the default model is an instruct model), greedy,
``ignore_eos`` off, first one at a time (batch 1) and then ``--batch`` at once. Per system x
workload x batch:

- decode tok/s: tokens after each request's first / (last token - first first token) of each
  group sent together, summed over the groups (TTFT excluded);
- ITL p50/p99: gaps between streamed messages with tokens (vLLM's definition: a message that
  carries several accepted tokens is one gap);
- acceptance (accepted / proposed) and tokens per verify step ((accepted + steps) / steps): the
  deltas over the cell of the decode workers' ``pdserve_spec_{proposed,accepted}_tokens_total``
  and ``pdserve_spec_verify_steps_total``; n/a where the counters are absent or did not move.

Greedy outputs must match token for token between the systems; the run exits 1 if any differ.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from prometheus_client.parser import text_string_to_metric_families

from engine.config import ModelConfig
from engine.model_files import default_cache_dir, resolve_model_path
from engine.settings import ENGINE
from pdserve.bench.metrics import LatencyStats
from pdserve.client import AsyncClient
from pdserve.local_cluster import free_port_range, start_cluster

SYSTEMS = ("off", "ngram", "draft")
DEFAULT_DRAFT_LAYERS = 4
TOKENIZER_FILES = (
    *("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"),
    *("vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json"),
)
REQUEST_TIMEOUT_S = 600.0
SPEC_COUNTERS = (
    "pdserve_spec_proposed_tokens_total",
    "pdserve_spec_accepted_tokens_total",
    "pdserve_spec_verify_steps_total",
)
SENTENCES = (
    "The harbour was quiet before dawn, and the fishing boats rocked against the pier.",
    "A committee of seven engineers reviewed the bridge design for three weeks.",
    "Fresh bread was sold at the corner bakery every morning except on Sundays.",
    "The library moved its rare maps to a climate-controlled room on the top floor.",
    "Rain fell steadily over the valley while the farmers waited to harvest the wheat.",
    "Her notebook listed every train departure between the capital and the coast.",
    "The new compiler release fixed a long-standing bug in the register allocator.",
    "Volunteers planted four hundred oak saplings along the river in a single weekend.",
    "Snow closed the mountain pass, so the convoy turned back toward the village.",
    "The orchestra rehearsed the final movement until the conductor was satisfied.",
    "The report recommended replacing the pumps before the summer drought began.",
    "Two cats slept on the windowsill, ignoring the pigeons gathered outside.",
)
STATEMENTS = (  # bodies of a function of x; {a}, {b}: seeded constants
    *("x = x + {a}", "if x > {a}:\n        x = x - {b}", "for i in range({a}):\n        x += i"),
    *("x = max(x, {a}) // {b}", "total.append(x * {a})", "while x < {a}:\n        x *= {b}"),
    *("if x % {b} == 0:\n        total.append(x)", "x = (x << {b}) ^ {a}"),
)
FUNCTION_NAMES = ("accumulate", "scale_values", "checksum", "fold_items", "step_counter")
NEW_NAMES = ("y", "value", "count", "acc")
TOPICS = (
    *("a lighthouse keeper", "a lost dog", "a dragon who cannot fly", "the first city on Mars"),
    *("a chess tournament", "a haunted library", "two rival bakers", "a storm at sea"),
    *("a robot learning to paint", "a time traveller's mistake", "a village without clocks"),
    *("a detective on a train", "an old tree", "a secret garden", "a broken violin", "a comet"),
)


class Workload(NamedTuple):
    name: str
    prompts: tuple[str, ...]


def repeat_prompt(rng: random.Random) -> str:
    text = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(8, 18)))
    return f"Repeat the following text exactly:\n{text}"


def rename_prompt(rng: random.Random) -> str:
    body = []
    for _ in range(rng.randint(10, 24)):
        body.append(rng.choice(STATEMENTS).format(a=rng.randint(2, 99), b=rng.randint(2, 9)))
    name, new = rng.choice(FUNCTION_NAMES), rng.choice(NEW_NAMES)
    code = f"def {name}(x, total):\n    " + "\n    ".join(body) + "\n    return x"
    return f"Rewrite this function renaming variable x to {new}:\n```python\n{code}\n```"


def grounded(n: int, seed: int) -> Workload:
    """Prompts whose answers copy them: text to repeat and code to rename, alternately."""
    rng = random.Random(seed)
    kinds = (repeat_prompt, rename_prompt)
    return Workload("grounded", tuple(kinds[i % 2](rng) for i in range(n)))


def ungrounded(n: int, seed: int) -> Workload:
    """Open-ended prompts: nothing in them to copy."""
    rng = random.Random(seed + 1)
    return Workload(
        "ungrounded", tuple(f"Write a story about {rng.choice(TOPICS)}." for _ in range(n))
    )


@dataclass(frozen=True)
class Stream:
    """One request as the client saw it; times on ``time.perf_counter``'s clock."""

    token_ids: tuple[int, ...]
    text: str
    prompt_tokens: int
    sent: float
    arrivals: tuple[float, ...]
    """When each message carrying tokens arrived."""


async def stream_one(client: AsyncClient, prompt: str, max_tokens: int) -> Stream:
    sent = time.perf_counter()
    ids: list[int] = []
    text: list[str] = []
    arrivals: list[float] = []
    prompt_tokens = 0
    async for chunk in client.generate(
        messages=[("user", prompt)],
        max_tokens=max_tokens,
        temperature=0.0,
        timeout=REQUEST_TIMEOUT_S,
    ):
        prompt_tokens = max(prompt_tokens, chunk.prompt_tokens)
        text.append(chunk.text)
        if chunk.token_ids:
            arrivals.append(time.perf_counter())
            ids.extend(chunk.token_ids)
    if not arrivals:
        raise RuntimeError(f"no token for prompt {prompt[:60]!r}")
    return Stream(tuple(ids), "".join(text), prompt_tokens, sent, tuple(arrivals))


def summarize(groups: Sequence[Sequence[Stream]]) -> dict[str, float]:
    """Decode tok/s, ITL and TTFT of groups of requests that were each sent together."""
    decode_tokens, decode_s, gaps, ttfts = 0, 0.0, [], []
    for group in groups:
        decode_tokens += sum(len(s.token_ids) - 1 for s in group)
        decode_s += max(s.arrivals[-1] for s in group) - min(s.arrivals[0] for s in group)
        for s in group:
            gaps += [b - a for a, b in zip(s.arrivals, s.arrivals[1:], strict=False)]
            ttfts.append(s.arrivals[0] - s.sent)
    itl = LatencyStats.of(gaps, (50.0, 99.0))
    streams = [s for group in groups for s in group]
    return {
        "decode_tok_per_s": decode_tokens / decode_s if decode_s > 0 else 0.0,
        "itl_p50_ms": itl.percentiles_ms[50.0],
        "itl_p99_ms": itl.percentiles_ms[99.0],
        "ttft_mean_ms": LatencyStats.of(ttfts, ()).mean_ms,
        "completion_tokens": float(sum(len(s.token_ids) for s in streams)),
        "token_messages": float(sum(len(s.arrivals) for s in streams)),
        "prompt_tokens_mean": sum(s.prompt_tokens for s in streams) / len(streams),
    }


def spec_counters(text: str) -> dict[str, float]:
    """The speculative-decoding counters in a Prometheus exposition, summed over labels."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in SPEC_COUNTERS:
                found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


def scrape(ports: Iterable[int]) -> dict[str, float]:
    """The counters summed over the workers on ``ports``."""
    total: dict[str, float] = {}
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            for name, value in spec_counters(reply.read().decode()).items():
                total[name] = total.get(name, 0.0) + value
    return total


def acceptance(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Acceptance rate and tokens per verify step over the deltas; None where not defined."""
    proposed, accepted, steps = (
        after[n] - before.get(n, 0.0) if n in after else None for n in SPEC_COUNTERS
    )
    return {
        "proposed": proposed,
        "accepted": accepted,
        "verify_steps": steps,
        "acceptance_rate": accepted / proposed if proposed and accepted is not None else None,
        "tokens_per_step": (accepted + steps) / steps if steps and accepted is not None else None,
    }


def truncated_draft(source: Path, layers: int, dest: Path) -> Path:
    """A self-speculative draft in ``dest``: ``source``'s first ``layers`` decoder layers, its
    final norm and lm_head (tied to the embeddings where the source's is), and its tokenizer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", local_files_only=True)
    total = model.config.num_hidden_layers
    if not 1 <= layers < total:
        raise SystemExit(f"--draft-layers must be in 1..{total - 1} for {source}, not {layers}")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):  # per-layer attention kinds, where present
        model.config.layer_types = model.config.layer_types[:layers]
    model.save_pretrained(dest)  # safetensors (transformers 5 writes nothing else)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
    return dest


def num_layers(folder: Path) -> int:
    return int(json.loads((folder / "config.json").read_text())["num_hidden_layers"])


def system_flags(system: str, num_spec: int | None, draft: Path | None = None) -> tuple[str, ...]:
    """``off`` is spelled out only where this engine knows the flag (else it is the default);
    ``draft`` names its model folder."""
    if system == "off":
        known = any(s.flag == "--speculative" for s in ENGINE)
        return ("--speculative", "off") if known else ()
    more = ("--num-speculative-tokens", str(num_spec)) if num_spec is not None else ()
    if system == "draft":
        if draft is None:
            raise ValueError("the draft system needs a draft model folder")
        more = ("--draft-model", str(draft), *more)
    return ("--speculative", system, *more)


async def run_cell(
    client: AsyncClient, ports: list[int], workload: Workload, batch: int, max_tokens: int
) -> dict[str, Any]:
    """The workload's prompts ``batch`` at a time, with the counters' deltas over the cell."""
    before = scrape(ports)
    groups = []
    for i in range(0, len(workload.prompts), batch):
        group = workload.prompts[i : i + batch]
        groups.append(await asyncio.gather(*(stream_one(client, p, max_tokens) for p in group)))
    streams = [s for g in groups for s in g]
    return {
        "workload": workload.name,
        "batch": batch,
        **summarize(groups),
        **acceptance(before, scrape(ports)),
        "outputs": [list(s.token_ids) for s in streams],
        "sample_output": streams[0].text[:300],
    }


async def run_cells(
    gateway: str, ports: list[int], workloads: list[Workload], args: argparse.Namespace
) -> list[dict[str, Any]]:
    async with AsyncClient(gateway) as client:
        await stream_one(client, "Say hello.", 4)  # warm up
        return [
            await run_cell(client, ports, w, batch, args.max_tokens)
            for w in workloads
            for batch in args.batches
        ]


def run_system(
    system: str,
    model: str,
    workloads: list[Workload],
    args: argparse.Namespace,
    logs: Path,
    draft: Path | None = None,
) -> list[dict[str, Any]]:
    prefill = 1 if args.mode == "disaggregated" else 0
    metrics_base = free_port_range(prefill + 3)  # gateway, workers, launcher
    flags = system_flags(system, args.num_speculative_tokens, draft)
    extra = (*flags, *args.cluster_args, "--metrics-base-port", str(metrics_base))
    try:
        cluster = start_cluster(model, prefill=prefill, decode=1, log_dir=logs, extra=extra)
    except RuntimeError as exc:
        tail = "\n".join(str(exc).splitlines()[-12:])
        raise SystemExit(
            f"system {system!r}: `pdserve up {' '.join(extra)}` did not start "
            f"(does this pdserve accept those flags?)\n{tail}"
        ) from exc
    try:
        decode_ports = [metrics_base + 1 + prefill]
        cells = asyncio.run(run_cells(cluster.gateway, decode_ports, workloads, args))
    finally:
        cluster.stop()
    return [{"system": system, **cell} for cell in cells]


def greedy_mismatches(cells: list[dict[str, Any]]) -> tuple[int, list[dict[str, Any]]]:
    """How many requests were compared between ``off`` and each other system, and which differ."""
    base = {(c["workload"], c["batch"]): c["outputs"] for c in cells if c["system"] == "off"}
    compared, differ = 0, []
    for cell in cells:
        ref = base.get((cell["workload"], cell["batch"]))
        if cell["system"] == "off" or ref is None:
            continue
        for i, (want, got) in enumerate(zip(ref, cell["outputs"], strict=True)):
            compared += 1
            if want != got:
                first = next(
                    (k for k, (a, b) in enumerate(zip(want, got, strict=False)) if a != b),
                    min(len(want), len(got)),
                )
                key = {"system": cell["system"], "workload": cell["workload"]}
                differ.append({**key, "batch": cell["batch"], "prompt": i, "first_diff": first})
    return compared, differ


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(cells: list[dict[str, Any]]) -> str:
    off = {(c["workload"], c["batch"]): c for c in cells if c["system"] == "off"}
    lines = [
        "| workload | batch | system | decode tok/s | speedup | ITL p50 ms | ITL p99 ms "
        "| tokens | prompt tok | accept | tok/step |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in sorted(cells, key=lambda c: (c["workload"], c["batch"], c["system"] != "off")):
        ref = off.get((c["workload"], c["batch"]))
        speedup = None
        if c["system"] != "off" and ref and ref["decode_tok_per_s"]:
            speedup = c["decode_tok_per_s"] / ref["decode_tok_per_s"]
        lines.append(
            f"| {c['workload']} | {c['batch']} | {c['system']} | {c['decode_tok_per_s']:.1f} "
            f"| {_fmt(speedup, '.2f')} | {c['itl_p50_ms']:.1f} | {c['itl_p99_ms']:.1f} "
            f"| {c['completion_tokens']:.0f} | {c['prompt_tokens_mean']:.0f} "
            f"| {_fmt(c['acceptance_rate'], '.2f')} | {_fmt(c['tokens_per_step'], '.2f')} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    systems = ",".join(SYSTEMS)
    parser.add_argument("--systems", default=systems, help=f"comma-separated, of {systems}")
    parser.add_argument("--mode", choices=("colocated", "disaggregated"), default="colocated")
    parser.add_argument("--prompts", type=int, default=16, help="per workload")
    parser.add_argument("--batch", type=int, default=16, help="the concurrent batch (and 1)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--num-speculative-tokens", type=int, default=None, help="engine default")
    more = "extra flag for every system's `pdserve up`, repeatable (--cluster-arg=--num-blocks=512)"
    parser.add_argument(
        "--cluster-arg", action="append", default=[], metavar="FLAG=VALUE", help=more
    )
    parser.add_argument(
        "--draft-layers",
        type=int,
        default=DEFAULT_DRAFT_LAYERS,
        help="draft: the target truncated to its first this many decoder layers",
    )
    parser.add_argument(
        "--draft-model", type=Path, default=None, help="draft: this folder instead of a truncation"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="the default model unless given")
    parser.add_argument("--quick", action="store_true", help="2 prompts, batch 1 and 2, 32 tokens")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.batch, args.max_tokens = 2, 2, 32
    args.batches = sorted({1, args.batch})
    args.cluster_args = [p for a in args.cluster_arg for p in a.split("=", 1)]
    args.systems = [s for s in args.systems.split(",") if s]
    if not args.systems or any(s not in SYSTEMS for s in args.systems):
        parser.error(f"--systems: a comma-separated subset of {','.join(SYSTEMS)}")
    if args.draft_model is not None and not (args.draft_model / "config.json").is_file():
        parser.error(f"--draft-model {args.draft_model}: not a transformers model folder")
    return args


def header(args: argparse.Namespace, draft_layers: int | None) -> str:
    batches = " and ".join(map(str, args.batches))
    line = (
        f"{args.mode}, {args.prompts} prompts per workload, batch {batches}, greedy, "
        f"at most {args.max_tokens} tokens, chat messages, 1 thread per worker"
    )
    if draft_layers is not None:
        how = f"--draft-model {args.draft_model}" if args.draft_model else "the target's first"
        line += f"; draft: {draft_layers} layers ({how})"
    return line


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = ModelConfig(model=args.model) if args.model else ModelConfig()
    model_path = resolve_model_path(replace(config, cache_dir=default_cache_dir()))
    model = args.model or str(model_path)
    workloads = [grounded(args.prompts, args.seed), ungrounded(args.prompts, args.seed)]
    cells: list[dict[str, Any]] = []
    layers: int | None = None
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp) / "logs"
        logs.mkdir()
        draft = None
        if "draft" in args.systems:
            draft = args.draft_model or truncated_draft(
                model_path, args.draft_layers, Path(tmp) / "draft"
            )
            layers = num_layers(draft)
        for system in args.systems:
            cells += run_system(system, model, workloads, args, logs, draft)
    compared, differ = greedy_mismatches(cells)
    print(header(args, layers) + "\n")
    print(table(cells))
    if compared:
        print(f"\ngreedy outputs: {len(differ)} of {compared} differ from off")
        for d in differ[:10]:
            print(f"  {d}")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        settings["draft_model_layers"] = layers
        greedy = {"compared": compared, "differ": differ}
        report = {"config": settings, "cells": cells, "greedy": greedy}
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
